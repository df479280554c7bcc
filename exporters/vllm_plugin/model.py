"""PonderForCausalLM for vLLM: per-token exits inside the forward, one vLLM attention layer per KV slot.

vLLM hands the model a flat batch of new tokens (every sequence's prefill chunk or decode token)
and owns the paged KV cache of each `Attention` layer. Layers: one per prelude layer, one per
core slot (max_depth, or one with kv_fill='shared'), one per coda layer. At core step s every
token writes its slot-s entry (an active token from its own block; an exited token by the
checkpoint's kv_fill), then the active tokens attend and run their block; the rest keep their
state. The exit head, the router and the step pieces are Ponder's own (runtime.model.PonderModel);
the blocks, embedding and head are on vLLM's tensor-parallel layers (parallel.py), so
`--tensor-parallel-size N` shards them N ways, and attention runs in vLLM.

Each request may set its own `compute_budget`, `exit_price`, `min_depth` and `max_depth` in the
OpenAI body's `vllm_xargs`: the logits processor in request_params.py publishes them per batch row
before each forward, and `_token_params` expands them to tokens. Requests without them get the
server's defaults from the Hugging Face config: `exit_price`, or `compute_budget` through the
calibration table (`vllm serve DIR --hf-overrides '{"compute_budget": 0.5}'`); none means full depth.
Exited decode tokens write their KV entries but skip attention (compaction.py) in batches whose
longest context reaches `compact_attention_min_context` keys (default 1024, where it was measured
to pay); the override `{"compact_attention": false}` makes every token attend at every step.
With `--pipeline-parallel-size N` the prelude layers, core steps and coda layers are split into N
contiguous stages (pipeline.py); the residual stream, the still-active mask and the depths so far
pass between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.sequence import IntermediateTensors

from exporters.vllm_plugin import compaction, request_params
from exporters.vllm_plugin.parallel import ParallelBlock, agree, load_into, materialize, parallel_pieces, tp_size
from exporters.vllm_plugin.pipeline import Stage
from runtime.config import ModelConfig
from runtime.layers import rope_tables
from runtime.model import PonderModel


def ponder_config(hf_config) -> ModelConfig:
    from exporters.hf import SUPPORTED_FIELDS

    return ModelConfig(**{name: getattr(hf_config, name) for name in SUPPORTED_FIELDS})


class PonderForCausalLM(nn.Module, SupportsPP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_config
        self.cfg = cfg = ponder_config(hf)
        self.price = request_params.server_price(hf)
        self.compact_attention = bool(getattr(hf, "compact_attention", True))  # compaction.py; off: every row attends
        self.compact_min_context = int(getattr(hf, "compact_attention_min_context", compaction.MIN_CONTEXT))
        pp = get_pp_group()
        self.stage = stage = Stage.of(cfg, pp.rank_in_group, pp.world_size)
        with torch.device("meta"):  # the replicated pieces; the sharded ones replace the rest before any memory
            self.ponder = PonderModel(cfg)
        for name, module in parallel_pieces(cfg, f"{prefix}ponder", stage).items():
            setattr(self.ponder, name, module)
        materialize(self.ponder)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)
        self.tp = tp_size()
        cache = vllm_config.cache_config
        # This rank's heads (the same for every block; vLLM's own arithmetic, as in QKVParallelLinear).
        self.n_heads, self.n_kv_heads = cfg.n_heads // self.tp, max(cfg.n_kv_heads // self.tp, 1)

        def attention(i: int) -> nn.Module:
            if not stage.holds_slot(i):
                return PPMissingLayer()
            return Attention(self.n_heads, cfg.head_dim, cfg.head_dim**-0.5, num_kv_heads=self.n_kv_heads,
                             cache_config=cache, prefix=f"{prefix}slots.{i}.attn")

        self.slots = nn.ModuleList(attention(i) for i in range(cfg.n_prelude + cfg.n_core_slots + cfg.n_coda))
        self.first_slot = next(s for s in self.slots if isinstance(s, Attention))  # its metadata is the batch's
        self.held_elsewhere = tuple(f"{name}." for name, module in self.ponder.named_modules()
                                    if isinstance(module, PPMissingLayer))

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype,
                                        device: torch.device) -> IntermediateTensors:
        return IntermediateTensors({"hidden_states": torch.zeros(batch_size, self.cfg.d_model, dtype=dtype, device=device),
                                    "active": torch.zeros(batch_size, dtype=dtype, device=device),
                                    "depth": torch.zeros(batch_size, dtype=dtype, device=device)})

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.ponder.embed(input_ids)

    def _layer(self, slot: int, block: ParallelBlock, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = block.qkv_rows(h, cos, sin)
        return block.finish(h, self.slots[slot](q, k, v))

    # ----- the forward -----

    def forward(self, input_ids: Tensor, positions: Tensor, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: Tensor | None = None, **kwargs) -> Tensor | IntermediateTensors:
        cfg, m, stage = self.cfg, self.ponder, self.stage
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)  # (N, D)
        if stage.first:
            h = inputs_embeds if inputs_embeds is not None else m.embed(input_ids)
            active = torch.ones(len(h), dtype=torch.bool, device=h.device)
            depth = torch.zeros(len(h), dtype=torch.long, device=h.device)
        else:
            h = intermediate_tensors["hidden_states"]
            active, depth = intermediate_tensors["active"] > 0, intermediate_tensors["depth"].long()
        for i in stage.prelude:
            h = self._layer(i, m.prelude[i], h, cos, sin)
        if stage.steps:
            h, active, depth = self._core(h, cos, sin, stage.steps, active, depth)
        if stage.ends_core:
            h = m.adapt_exit(h, depth)  # identity for models without exit adapters
        for i in stage.coda:
            h = self._layer(cfg.n_prelude + cfg.n_core_slots + i, m.coda[i], h, cos, sin)
        if not stage.last:
            return IntermediateTensors({"hidden_states": h, "active": active.to(h.dtype), "depth": depth.to(h.dtype)})
        return h

    def _token_params(self, N: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Each token's (price, min_depth, max_depth): its request's, as the logits processor published
        them for this step's batch rows, expanded by the rows' token counts; the server's defaults where
        there is nothing (profile and dummy runs, or no processor loaded)."""
        cfg = self.cfg
        price = torch.full((N,), -math.inf if self.price is None else self.price, device=device)
        lo = torch.full((N,), cfg.min_depth, dtype=torch.long, device=device)
        hi = torch.full((N,), cfg.max_depth, dtype=torch.long, device=device)
        rows, metadata = request_params.current(), get_forward_context().attn_metadata
        if rows is None or metadata is None:
            return price, lo, hi
        meta = metadata[self.first_slot.layer_name] if isinstance(metadata, dict) else metadata
        counts = meta.query_start_loc.diff()
        if len(counts) != len(rows.price) or int(counts.sum()) > N:
            return price, lo, hi  # not this step's rows: defaults rather than another request's
        n = int(counts.sum())
        price[:n] = torch.repeat_interleave(rows.price.to(device), counts)
        lo[:n] = torch.repeat_interleave(rows.min_depth.to(device), counts)
        hi[:n] = torch.repeat_interleave(rows.max_depth.to(device), counts).clamp_max(cfg.max_depth)
        return price, lo, hi

    def _core(self, h: Tensor, cos: Tensor, sin: Tensor, steps: range, active: Tensor,
              depth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Core steps `steps` on states h: the states after them, which tokens are still in the core,
        and each token's depth (core steps run)."""
        cfg, m = self.cfg, self.ponder
        N = len(h)
        price, lo, hi = self._token_params(N, h.device)
        first_priced = int(lo.min()) if bool(torch.isfinite(price).any()) else cfg.max_depth  # one sync, not one per step
        latest_k = latest_v = shared_kv = None
        plans: dict = {}  # compaction's cut-down attention metadata, for this forward
        for s in steps:
            h_step = m.step_input(h, s)
            stop = s >= hi
            if s >= first_priced:
                stop |= (s >= lo) & (m.exit_score(h_step, s).float() < price)
            choice = m.route_logits(h_step).argmax(-1) if m.router is not None else None
            # Exit scores and routes are the model's decisions: every rank takes rank 0's (caps alone agree).
            if self.tp > 1 and (s >= first_priced or choice is not None):
                stop, *routed = agree(stop, *([] if choice is None else [choice]))
                stop, choice = stop.bool(), routed[0] if routed else None
            active &= ~stop
            depth += active
            groups = self._groups(h_step, choice, s)
            q, k, v = self._project(groups, cos, sin, N)
            if cfg.kv_fill.reads_slot0:  # every slot reads slot 0: rewrite its entries, attend with new queries
                if shared_kv is None:
                    shared_kv = (k, v)
                k, v = shared_kv
            elif cfg.kv_fill.copies_deepest:  # exited rows copy their deepest computed entry
                if latest_k is not None:
                    k, v = torch.where(active[:, None], k, latest_k), torch.where(active[:, None], v, latest_v)
                latest_k, latest_v = k, v
            slot = self.slots[cfg.n_prelude + cfg.kv_fill.slot(s)]
            out = (compaction.attend(slot, q, k, v, active, plans, self.compact_min_context) if self.compact_attention
                   else slot(q, k, v))
            h = self._finish(h, groups, out, active)
        return h, active, depth

    def _groups(self, h_step: Tensor, choice: Tensor | None, s: int) -> list[tuple[int, Tensor | None, Tensor]]:
        """(block, its rows, their block inputs) per block taken at step s; rows None means every row
        (the fixed and recurrent schedules), so no gather or scatter is needed."""
        m = self.ponder
        if choice is None:
            b = m.scheduled_block(s)
            return [(b, None, m.block_input(h_step, b))]
        groups = []
        for b in sorted(set(choice.tolist())):
            rows = (choice == b).nonzero().squeeze(1)
            groups.append((b, rows, m.block_input(h_step[rows], b)))
        return groups

    def _project(self, groups: list, cos: Tensor, sin: Tensor, N: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every row's q, k, v from the block it takes (this rank's heads)."""
        m = self.ponder
        if len(groups) == 1 and groups[0][1] is None:
            b, _, x = groups[0]
            return m.pool[b].qkv_rows(x, cos, sin)
        D = self.cfg.head_dim
        q, k = groups[0][2].new_zeros(N, self.n_heads * D), groups[0][2].new_zeros(N, self.n_kv_heads * D)
        v = torch.zeros_like(k)
        for b, rows, x in groups:
            q[rows], k[rows], v[rows] = m.pool[b].qkv_rows(x, cos[rows], sin[rows])
        return q, k, v

    def _finish(self, h: Tensor, groups: list, out: Tensor, active: Tensor) -> Tensor:
        """The states after the step: active rows through their block's output projection and MLP;
        rows that left the core keep theirs."""
        m = self.ponder
        if len(groups) == 1 and groups[0][1] is None and bool(active.all()):
            b, _, x = groups[0]
            return m.pool[b].finish(x, out)
        h = h.clone()
        for b, rows, x in groups:
            rows = torch.arange(len(h), device=h.device) if rows is None else rows
            keep = active[rows].nonzero().squeeze(1)
            if len(keep):
                h[rows[keep]] = m.pool[b].finish(x[keep], out[rows[keep]])
        return h

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        return self.logits_processor(self.ponder.head, self.ponder.norm(hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Ponder-named tensors (a `ponder export --format hf` directory) into this rank's shards."""
        params = dict(self.ponder.named_parameters())
        loaded = {f"ponder.{held}" for name, tensor in weights
                  if (held := load_into(params, name, tensor, self.held_elsewhere)) is not None}
        missing = {f"ponder.{n}" for n in params} - loaded
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:5]}")
        return loaded
