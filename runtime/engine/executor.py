"""One engine iteration over many sequences, with per-token depth.

The tokens of all scheduled chunks are flattened into one batch of N rows. Then:
  - the prelude runs for all rows;
  - at core step s the exit head decides per row whether it leaves the core (each row carries
    its request's price and depth bounds, `_exit_bars`). Every row's slot-s entry is written
    before any row attends: rows are grouped by the block they take and each group is one
    projection call; with kv_fill='propagate' rows that left the core write their fill entry
    in the same call, from their exit state. Then each group's rows still in the core attend
    and run the block's MLP: one gather -> block call -> scatter per group, so the cost of a
    step scales with its active rows. A pure decode step attends in one padded call; otherwise
    each sequence attends over exactly its own context, in calls batched where that wastes little
    (on the flash kernel, every whole prompt and chunk in one call over the cache in place; else whole
    prompts per length bucket, causal; single rows together; `_attend_per_sequence`);
  - the coda and head run on each row's exit state.
Exits are decided on the host (runtime/engine/live_rows.py). On CPU a decode step runs each layer of a
group as one native call where every piece of it would be native (`_whole_layer`, runtime/decode_layer.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

import torch
from torch import Tensor

from runtime import paged_attention
from runtime.flash_attention import flash_paged_attention
from runtime.attention import (CAUSAL_BLOCK, attend, causal_kernel, decode_in_place, decodes_in_place,
                               warm_up_attention)
from runtime.decode_layer import decode_layer, measure_whole_layers, runs_whole
from runtime.engine.kv_cache import PagedKVCache
from runtime.engine.live_rows import LiveRows
from runtime.engine.outputs import ModelRunnerOutput, PromptScores
from runtime.engine.sampler import SampleRow, sample, score_tokens
from runtime.engine.scheduler import ScheduledChunk, SchedulerOutput
from runtime.engine.structured_output import StructuredOutputManager
from runtime.layers import Block, Linear, rope_tables, warm_up_linears
from runtime.model import PonderModel
from runtime.paged_attention import paged_decode, rope_and_cache
from runtime.row_buckets import empty_rows

log = logging.getLogger(__name__)

_UNRESOLVED = object()  # the exit head's native call, before a step's first exit test resolves it
Layer = tuple[str, int]  # ("prelude", i), ("pool", b) or ("coda", i)
# A prompt's rows past its whole CAUSAL_BLOCKs attend as single rows, on the cache in place, when they
# are at most this many: per query-key pair the decode kernel cost ~4x the grouped GEMMs (bf16, one
# Zen 4 CPU), so up to a quarter of a block it beats a padded block of 128 queries. Not where prompts
# run on the flash kernel, which pays for 16 rows at a time, not 128: on AMX tiles the split cost 1.04x
# at 134 and 1040 tokens (one AMX Xeon; with SDPA there it saved 1.5-4.5%, with grouped GEMMs 17%).
# Such prompts take the flash branch of `_attend_per_sequence` first.
PROMPT_TAIL_ROWS = CAUSAL_BLOCK // 4


@dataclass
class SeqInput:
    """One sequence's chunk for this iteration; its earlier positions are already cached."""

    token_ids: list[int]
    start_position: int
    block_table: list[int]
    price: float | None = None  # None: no price exit (full depth, within the bounds below)
    min_depth: int | None = None
    max_depth: int | None = None
    depths: list[int] | None = None  # forced per-token depths (an explicit exit specification)
    all_logits: bool = False  # logits for every token of the chunk (prompt logprobs), not only the last
    position_offset: int = 0  # RoPE position = cache position + this (tokens of discarded thoughts)


@dataclass
class SeqOutput:
    logits: Tensor  # (T, V) for every token with all_logits, else (1, V) for the last
    depths: list[int]  # core blocks actually applied to each token
    paths: Tensor  # (T, max_depth) block per step, -1 where none ran


@dataclass
class _Batch:
    positions: Tensor  # (N,)
    index: Tensor  # (N,) flat cache position of each row
    seq: Tensor  # (N,) sequence number of each row
    tables: Tensor  # (S, W) each sequence's block table, padded with block 0; its context is W * block_size keys
    ctx_len: Tensor  # (S,)
    cos: Tensor  # (N, D)
    sin: Tensor
    one_row_per_seq: bool  # a pure decode step: row i is sequence i
    decode_mask: Tensor | None  # (S, 1, W * block_size) True on each sequence's context, for decode steps
    starts: list[int]  # each sequence's first position in this chunk
    lengths: list[int]  # each sequence's chunk length

    _taken: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.positions)

    def take(self, name: str, rows: Tensor) -> Tensor:
        """The per-row (or per-sequence, in a decode step) tensor `name` at rows: itself for all rows in order,
        else indexed once per rows tensor, which stays the same from step to step until rows exit."""
        t = getattr(self, name)
        if len(rows) == self.num_rows:
            return t
        hit = self._taken.get(name)
        if hit is None or hit[0] is not rows:
            hit = self._taken[name] = (rows, t[rows])
        return hit[1]


@dataclass
class Padding:
    """Rows of several sequences laid out per sequence as (R, M, ...): row i at [inverse[i], rank[i]].
    In a decode step every row is its own sequence, so padding is a reshape."""

    inverse: Tensor | None
    rank: Tensor | None
    R: int
    M: int

    def pad(self, t: Tensor) -> Tensor:
        if self.inverse is None:
            return t[:, None]
        out = t.new_zeros(self.R, self.M, *t.shape[1:])
        out[self.inverse, self.rank] = t
        return out

    def unpad(self, t: Tensor) -> Tensor:
        return t[:, 0] if self.inverse is None else t[self.inverse, self.rank]


class Executor:
    per_sequence_attention = True  # prefill and mixed steps attend one sequence at a time (`_attend_per_sequence`)
    _rope_and_cache = False  # RoPE and the cache write as one native call (set in __init__ where it runs)

    def __init__(self, model: PonderModel, cache: PagedKVCache, fuse_linears: bool = True) -> None:
        self.model, self.cache, self.cfg = model, cache, model.cfg
        self.device = next(model.parameters()).device
        blocks = [*model.prelude, *model.pool, *model.coda]
        if fuse_linears:  # q/k/v and gate/up as one GEMM each (runtime/layers.py: fuse_linears)
            for block in blocks:
                block.fuse()
        model.stack_exit_adapters()  # a step's exit adapters in one call where it runs (runtime/exit_adapters.py)
        # RoPE and the cache write as one native call (`_project_and_write`): torch's CPU backend only,
        # every block's q/k/v fused, the cache in the activation dtype
        self._rope_and_cache = (type(self)._project is Executor._project and self.device.type == "cpu"
                                and all(b.attn.wqkv is not None for b in blocks)
                                and cache.k.dtype == model.head.weight.dtype
                                and paged_attention.available(cache.k.dtype, self.device))
        self._init_state()

    def _init_state(self) -> None:
        self.num_block_calls = 0  # core block applications (row-level), for accounting
        self.num_batched_calls = 0  # core block calls (one per block group and step), for accounting
        self.num_fill_calls = 0  # K/V projection calls of groups whose rows all left the core
        self.num_core_steps = 0  # block applications to the positions run (each position counted once)
        self.num_core_steps_full = 0  # what full depth would have run for the same positions
        self.block_steps = [0] * self.cfg.n_pool  # block applications per pool block
        self._generators: dict[str, torch.Generator] = {}  # per request, so seeded sampling is batch-invariant
        self.structured: StructuredOutputManager | None = None  # grammar matchers per request; EngineCore sets it

    def warm_up(self, max_rows: int, max_seqs: int, max_len: int) -> dict:
        """On CPU, measure every kernel choice and build every kernel shape that a step of at most max_rows
        rows and max_seqs sequences over at most max_len keys can run (runtime/layers.py: warm_up_linears;
        runtime/attention.py: warm_up_attention), then run one prompt of the largest step, so that memory
        is claimed before the first request and no request pays a kernel build. Returns the number of
        kernel calls run. Call it before any request (it resets the executor's counters)."""
        if self.device.type != "cpu":
            return {"linear_calls": 0, "attention_calls": 0}
        blocks = [*self.model.prelude, *self.model.pool, *self.model.coda]
        fused = [m for b in blocks for m in (b.attn.wqkv, b.mlp.w_gate_up) if m is not None]  # not submodules
        replaced = {id(m) for b in blocks for m in ((b.attn.wq,) if b.attn.wqkv is not None else ())
                    + ((b.mlp.w_gate, b.mlp.w_up) if b.mlp.w_gate_up is not None else ())}  # never run: not packed
        linears = [m for m in self.model.modules() if isinstance(m, Linear) and id(m) not in replaced] + fused
        cfg, dtype = self.cfg, self.model.head.weight.dtype
        calls = {"linear_calls": warm_up_linears(linears, max_rows),
                 "attention_calls": warm_up_attention(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, dtype, max_seqs,
                                                      max_len, max_prompt=max_rows)}
        if self._rope_and_cache:
            calls["whole_layer_rows"] = measure_whole_layers(blocks, self.cache.block_size)
        # One prompt of the largest step, like vLLM's profile run: the heap grows to a step's peak now. Its
        # entries land in free blocks, which nothing reads before a request writes them.
        T = min(max_rows, max_len, self.cache.num_blocks * self.cache.block_size)
        self.run([SeqInput([0] * T, 0, list(range(-(-T // self.cache.block_size))))])
        self._init_state()
        return calls

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: the forward over every scheduled chunk, then sampling and prompt scores.
        A failure fails the step's requests (`ModelRunnerOutput.failed`), never the engine."""
        for rid in scheduler_output.finished_ids:
            self._generators.pop(rid, None)
        if self.structured is not None:
            self.structured.drop(scheduler_output.finished_ids)
        moves = scheduler_output.kv_moves
        self.cache.move([src for src, _ in moves], [dst for _, dst in moves])
        chunks = scheduler_output.scheduled
        if not chunks:
            return ModelRunnerOutput()
        try:
            return self._execute(chunks)
        except Exception as e:
            log.exception("engine step failed")
            return ModelRunnerOutput(failed={c.request_id: f"{type(e).__name__}: {e}" for c in chunks})

    def _execute(self, chunks: list[ScheduledChunk]) -> ModelRunnerOutput:
        scores_prompt = [c.request.wants_prompt_scores and c.start_position < len(c.request.prompt_token_ids) - 1
                         for c in chunks]
        seqs = [SeqInput(c.token_ids, c.start_position, c.block_table, price=c.request.price,
                         min_depth=c.request.compute.min_depth, max_depth=c.request.compute.max_depth,
                         all_logits=scores, position_offset=c.position_offset) for c, scores in zip(chunks, scores_prompt)]
        samplers = [i for i, c in enumerate(chunks) if c.samples]
        requests = [chunks[i].request for i in samplers]
        assert self.structured is not None or all(r.grammar is None for r in requests), "EngineCore sets structured"
        allowed = self.structured.bitmask(requests) if self.structured is not None else None  # before the forward
        outs = self.run(seqs)
        result = ModelRunnerOutput(depths={c.request_id: out.depths for c, out in zip(chunks, outs)})
        if samplers:
            logits = torch.cat([outs[i].logits[-1:] for i in samplers])
            sampled = sample(logits, [self._sample_row(chunks[i]) for i in samplers], allowed)
            for i, s in zip(samplers, sampled):
                result.sampled[chunks[i].request_id] = s
            if allowed is not None:
                result.grammar_complete, result.failed = self.structured.accept(requests, [s.token_id for s in sampled])
        for chunk, out, scores in zip(chunks, outs, scores_prompt):
            scored = self._score_prompt(chunk, out) if scores else None
            if scored is not None:
                result.prompt_scores[chunk.request_id] = scored
        paths = torch.cat([out.paths for out in outs])
        counts = torch.bincount(paths[paths >= 0].cpu(), minlength=self.cfg.n_pool).tolist()
        self.block_steps = [a + b for a, b in zip(self.block_steps, counts)]
        num_positions = sum(len(c.token_ids) for c in chunks)
        self.num_core_steps += sum(sum(out.depths) for out in outs)
        self.num_core_steps_full += num_positions * self.cfg.max_depth
        return result

    def _sample_row(self, chunk: ScheduledChunk) -> SampleRow:
        req = chunk.request
        generator = self._generators.get(req.request_id)
        if generator is None:
            generator = self._generators[req.request_id] = torch.Generator().manual_seed(req.sampling.seed or 0)
        return SampleRow(req.sampling, req.prompt_token_ids, req.output_token_ids, generator, req.banned_ids(),
                         forced=req.thoughts.forced_token())

    @staticmethod
    def _score_prompt(chunk: ScheduledChunk, out: SeqOutput) -> PromptScores | None:
        """Logprobs of the prompt tokens this chunk predicts: position p's logits score token p + 1.
        A chunk replayed after preemption covers positions already scored; those are skipped."""
        req, start = chunk.request, chunk.start_position
        first, end = max(start, req.num_prompt_scored), min(start + len(chunk.token_ids), len(req.prompt_token_ids) - 1)
        if first >= end:
            return None
        return score_tokens(out.logits[first - start : end - start], req.prompt_token_ids[first + 1 : end + 1],
                            out.depths[first - start : end - start], req.sampling.prompt_logprobs)

    @torch.inference_mode()
    def run(self, seqs: list[SeqInput], all_logits: bool = False) -> list[SeqOutput]:
        cfg, D = self.cfg, self.cfg.max_depth
        batch = self._batch(seqs)
        N = batch.num_rows
        ids = torch.tensor([t for s in seqs for t in s.token_ids], device=self.device)
        bar = self._exit_bars(seqs)
        first_exit_step, first_priced_step = self._first_exit_steps(seqs)
        self._exit_scorer = _UNRESOLVED

        h = self._embed(ids)
        for layer in range(cfg.n_prelude):
            h = self._layer(("prelude", layer), h, self.cache.prelude_slot(layer), batch)

        path = torch.full((N, D), -1, dtype=torch.long, device=self.device)
        live = LiveRows(N, D, self.device)  # rows still in the core
        all_rows = live.rows
        for s in range(D):
            # Every row's slot-s entry: with propagate (and at slot 0 for every policy) it is the row's
            # state through the block it takes at step s, so all rows share the projection calls.
            every = cfg.kv_fill.fills_by_projection or s == 0
            if not len(live) and not every:
                if cfg.kv_fill.copies_deepest:  # every row has exited: each passes its deepest entry down
                    self.cache.copy(self.cache.core_slot(s - 1), self.cache.core_slot(s), batch.index)
                continue
            rows = all_rows if every else live.rows
            h_step, score = self._gate(self._take(h, rows, N), s, need_score=s >= first_priced_step and len(live) > 0)
            if len(live) and s >= first_exit_step:
                stop = live.stops(bar, s, score, of_all_rows=every)
                if stop.any():
                    live.leave(stop, s)
                    if not every:
                        rows, h_step = live.rows, h_step[torch.from_numpy(~stop).to(self.device)]
            h = self._core_step(s, h, h_step, rows, live, path, batch)

        depth = torch.from_numpy(live.depth).to(self.device)
        h = self._adapt(h, depth)
        for layer in range(cfg.n_coda):
            h = self._layer(("coda", layer), h, self.cache.coda_slot(layer), batch)
        return self._outputs(seqs, h, depth, path, all_logits)

    def _core_step(self, s: int, h: Tensor, h_step: Tensor, rows: Tensor, live: LiveRows, path: Tensor,
                   batch: _Batch) -> Tensor:
        """Core step s for `rows` (step inputs h_step): grouped by the block each takes, each group writes
        its slot-s entries in one projection call; then the group's rows still in the core attend and run
        the block's MLP. Exited rows among `rows` only write (their kv_fill entry)."""
        cfg, N = self.cfg, batch.num_rows
        slot = self.cache.core_slot(s)
        if cfg.kv_fill.copies_deepest and s > 0 and len(live) < N:  # exited rows: a copy of their deepest entry
            self.cache.copy(self.cache.core_slot(s - 1), slot, batch.index[~live.alive])
        has_exited = len(rows) > len(live)  # rows include exited ones, which only write their entry
        runs = []
        for b, group, x in self._groups(h_step, rows, s) if len(rows) else []:  # all write before any attends
            keep, kept = live.within(group) if has_exited else (None, group)
            goes_on = len(kept) > 0  # a group of exited rows only fills: no queries
            cos, sin, index = (batch.take(name, group) for name in ("cos", "sin", "index"))
            # A decode step's rows attend over their own sequences only: a group may write and attend at once
            out = self._whole_layer(("pool", b), x, cos, sin, slot, index, keep, kept, batch) \
                if cfg.kv_fill.writes_slot(s) else None
            if out is not None:
                if goes_on:
                    runs.append((b, kept, x, None, out))
                else:
                    self.num_fill_calls += 1
                continue
            if cfg.kv_fill.writes_slot(s):  # shared: the single core slot keeps the step-0 entry
                q = self._project_and_write(("pool", b), x, cos, sin, slot, index, queries=goes_on)
            else:
                q = self._project(("pool", b), x, cos, sin, queries=goes_on)[2]
            if not goes_on:
                self.num_fill_calls += 1
            else:
                if keep is not None:
                    x, q = x[keep], None if q is None else q[keep]
                runs.append((b, kept, x, q, None))
        for b, group, x, q, out in runs:  # out: the layer's outputs, where one call ran it whole
            if out is None:
                out = self._attend(("pool", b), x, q, group, slot, batch)
            if len(group) == N:  # all rows, in order
                h = out
            else:
                h[group] = out
            path[group, s] = b
            self.num_block_calls += len(group)
            self.num_batched_calls += 1
        return h

    def _groups(self, h_step: Tensor, rows: Tensor, s: int) -> list[tuple[int, Tensor, Tensor]]:
        """(block, rows, block-step inputs) for each block the rows take at step s."""
        if self.cfg.schedule != "routed":
            return [(s if self.cfg.schedule == "fixed" else 0, rows, h_step)]
        choice = self._route_logits(h_step).argmax(-1)
        return [(b, rows[sel], h_step[sel]) for b, sel in ((b, choice == b) for b in sorted(set(choice.tolist())))]

    @staticmethod
    def _take(t: Tensor, rows: Tensor, num_rows: int) -> Tensor:
        """t[rows], without a copy when rows are all rows in order."""
        return t if len(rows) == num_rows else t[rows]

    # ----- compute: the only methods that touch weights (an ONNX backend overrides them) -----

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.embed(ids)

    def _gate(self, h: Tensor, s: int, need_score: bool) -> tuple[Tensor, Tensor | None]:
        """The step input h + P(s) of rows h (n, d), and their exit scores if needed. The exit head's native
        call is resolved once a step (`run` unsets it): per call, its checks cost more than its kernel."""
        h_step = self.model.step_input(h, s)
        if not need_score:
            return h_step, None
        if self._exit_scorer is _UNRESOLVED:  # rows only shrink within a step: what runs the first test runs all
            self._exit_scorer = self.model.exit_head.native_scorer(h_step)
        if self._exit_scorer is not None:
            return h_step, self._exit_scorer(h_step, s)
        return h_step, self.model.exit_score(h_step, s)

    def _route_logits(self, h_step: Tensor) -> Tensor:
        return self.model.route_logits(h_step)

    def _block(self, layer: Layer, x: Tensor) -> tuple[Block, Tensor]:
        """The block of a layer and its input: a pool block adds its block embedding to h_step."""
        kind, i = layer
        if kind == "pool":
            return self.model.pool[i], self.model.block_input(x, i)
        return getattr(self.model, kind)[i], x

    def _project(self, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor,
                 queries: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """The slot entries k, v (n, Hkv, D) that rows with input x (n, d) write, and what `_block_padded`
        may reuse for the same rows (here their rotated queries (n, H, D), from the same norm), if asked."""
        block, x = self._block(layer, x)
        return block.project_rows(x, cos, sin, queries)

    def _project_and_write(self, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor, slot: int, index: Tensor,
                           queries: bool = True) -> Tensor | None:
        """`_project`, with the entries written to rows index of the cache slot; returns the queries. On
        CPU with the native kernels, the fused q/k/v projection's RoPE and write are one call."""
        if queries and self._rope_and_cache:
            block, x = self._block(layer, x)
            attn = block.attn
            return rope_and_cache(attn.wqkv(block.attn_norm(x)), attn.n_heads, attn.n_kv_heads, cos, sin,
                                  *self.cache.in_place(slot), index)
        k, v, q = self._project(layer, x, cos, sin, queries)
        self.cache.write(slot, index, k, v)
        return q

    def _block_padded(self, layer: Layer, x: Tensor, q: Tensor | None, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                      mask: Tensor, padding: Padding) -> Tensor:
        """The layer on rows x (n, d) with queries q from `_project`, attending per sequence (padded
        by `padding`) to k, v (R, Hkv, L, D) under mask (R, M, L). Returns (n, d)."""
        block, x = self._block(layer, x)
        q_pad = padding.pad(q).transpose(1, 2)  # (R, H, M, D)
        out = attend(q_pad, k, v, mask)
        return block.feedforward(x, block.attn.out(padding.unpad(out.transpose(1, 2)).flatten(1)))

    def _block_rows(self, layer: Layer, x: Tensor, attn: Tensor) -> Tensor:
        """The layer on rows x (n, d) given their attention outputs (n, H, D)."""
        block, x = self._block(layer, x)
        return block.feedforward(x, block.attn.out(attn.flatten(1)))

    def _adapt(self, h: Tensor, depth: Tensor) -> Tensor:
        """Exit adapters on rows h (n, d) by their core depth (identity for models without them)."""
        return self.model.adapt_exit(h, depth)

    def _logits(self, h: Tensor) -> Tensor:
        return self.model.head(self.model.norm(h))

    # ----- batch layout -----

    def _batch(self, seqs: list[SeqInput]) -> _Batch:
        """Row and context indices from the block tables, as tensor ops (no per-position Python)."""
        bs, dev = self.cache.block_size, self.device
        starts = torch.tensor([s.start_position for s in seqs], device=dev)
        counts = torch.tensor([len(s.token_ids) for s in seqs], device=dev)
        ctx_len = starts + counts
        width = -(-max(s.start_position + len(s.token_ids) for s in seqs) // bs)  # blocks holding the longest context
        tables = torch.tensor([(s.block_table + [0] * width)[:width] for s in seqs], device=dev)
        key_pos = torch.arange(width * bs, device=dev)  # keys past a sequence's context are masked by position
        seq_ids = torch.repeat_interleave(torch.arange(len(seqs), device=dev), counts)
        pos = starts[seq_ids] + torch.arange(len(seq_ids), device=dev) - (torch.cumsum(counts, 0) - counts)[seq_ids]
        offsets = torch.tensor([s.position_offset for s in seqs], device=dev)
        # Cache order is causal order; RoPE keeps token positions. The tables in the activation dtype, once per step.
        dtype = self.cache.k.dtype  # the activation dtype (an ONNX backend has no torch model)
        cos, sin = (t.to(dtype) for t in rope_tables(pos + offsets[seq_ids], self.cfg.head_dim, self.cfg.rope_theta))
        decode = all(len(s.token_ids) == 1 for s in seqs)
        decode_mask = (key_pos[None, :] < ctx_len[:, None])[:, None] if decode else None
        index = tables[seq_ids, pos // bs] * bs + pos % bs
        return _Batch(pos, index, seq_ids, tables, ctx_len, cos, sin, decode, decode_mask,
                      [s.start_position for s in seqs], [len(s.token_ids) for s in seqs])

    def _exit_bars(self, seqs: list[SeqInput]) -> np.ndarray:
        """(N, max_depth), on the host: a row exits before step s when its exit score is below bar[row, s];
        +inf from its cap (max depth or forced depth) on, its price from its min depth on, -inf before."""
        cfg, price, lo, cap = self.cfg, [], [], []
        for s in seqs:
            n = len(s.token_ids)
            price += [-math.inf if s.price is None else s.price] * n
            lo += [cfg.min_depth if s.min_depth is None else s.min_depth] * n
            hi = cfg.max_depth if s.max_depth is None else min(s.max_depth, cfg.max_depth)
            cap += [min(hi, d) for d in s.depths] if s.depths is not None else [hi] * n
        step = np.arange(cfg.max_depth)[None, :]
        price, lo, cap = (np.array(x)[:, None] for x in (price, lo, cap))
        priced = np.where(step >= lo, price.astype(np.float32), -np.inf)
        return np.where(step >= cap, np.inf, priced).astype(np.float32)

    def _first_exit_steps(self, seqs: list[SeqInput]) -> tuple[int, int]:
        """The first step at which any row could exit, and the first at which one could exit by price;
        before them the exit tests (and the exit head) are skipped."""
        cfg, D = self.cfg, self.cfg.max_depth
        priced = [cfg.min_depth if q.min_depth is None else q.min_depth for q in seqs if q.price is not None]
        capped = [min(q.depths) if q.depths else D for q in seqs] + [q.max_depth for q in seqs if q.max_depth is not None]
        first_priced = min(priced, default=D)
        return min([first_priced, *capped]), first_priced

    # ----- layers over rows -----

    def _layer(self, layer: Layer, h: Tensor, slot: int, batch: _Batch) -> Tensor:
        """A prelude or coda layer: every row writes its entry, then every row attends."""
        rows = torch.arange(len(h), device=self.device)
        out = self._whole_layer(layer, h, batch.cos, batch.sin, slot, batch.index, None, rows, batch)
        if out is not None:
            return out
        q = self._project_and_write(layer, h, batch.cos, batch.sin, slot, batch.index)
        return self._attend(layer, h, q, rows, slot, batch)

    def _attend(self, layer: Layer, x: Tensor, q: Tensor | None, rows: Tensor, slot: int, batch: _Batch) -> Tensor:
        """The layer on rows (inputs x: (n, d)) over their sequences' cached slot. A decode step is one
        padded call (row i is sequence i); otherwise each sequence attends over its own context
        (`_attend_per_sequence`), or, for a backend without that, all rows in one padded call."""
        if batch.one_row_per_seq and self._in_place(q, batch.tables.shape[1] * self.cache.block_size):
            tables, ctx_len = batch.take("tables", rows), batch.take("ctx_len", rows)
            out = paged_decode(q, *self.cache.in_place(slot), tables, ctx_len, self.cache.block_size)
            return self._block_rows(layer, x, out)
        if batch.one_row_per_seq:  # decode: every row is its own sequence
            padding = Padding(None, None, len(rows), 1)
            tables, mask = batch.take("tables", rows), batch.take("decode_mask", rows)
        elif self.per_sequence_attention:
            return self._block_rows(layer, x, self._attend_per_sequence(q, rows, slot, batch))
        else:
            seq = batch.seq[rows]
            present, inverse, counts = torch.unique(seq, return_inverse=True, return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(len(rows), device=self.device) - starts[inverse]  # rows of a sequence are contiguous
            padding = Padding(inverse, rank, len(present), int(counts.max()))
            pos_pad = padding.pad(batch.positions[rows])
            tables = batch.tables[present]
            key_pos = torch.arange(tables.shape[1] * self.cache.block_size, device=self.device)
            mask = key_pos[None, None, :] <= pos_pad[:, :, None]  # causal (R, M, L)
        k, v = self.cache.gather(slot, tables)
        cos, sin = batch.take("cos", rows), batch.take("sin", rows)
        return self._block_padded(layer, x, q, k.to(x.dtype), v.to(x.dtype), cos, sin, mask, padding)

    def _whole_layer(self, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor, slot: int, index: Tensor,
                     keep: Tensor | None, kept: Tensor, batch: _Batch) -> Tensor | None:
        """In a decode step, the layer on rows x (n, d) in one native call (runtime/decode_layer.py): every
        row writes its slot entry to the cache at index, and the rows keep (positions in x, all where None),
        which are the batch's rows kept, attend and run the MLP; returns their outputs. None where the
        layer's pieces would not all take native kernels: the caller runs them one by one."""
        cfg = self.cfg
        if not (self._rope_and_cache and batch.one_row_per_seq and x.dtype == self.cache.k.dtype
                and decodes_in_place(self.device, x.dtype, cfg.n_heads, cfg.head_dim, cfg.n_kv_heads,
                                     batch.tables.shape[1] * self.cache.block_size)):
            return None
        block, x = self._block(layer, x)
        if not runs_whole(block, x, self.cache.k.dtype):
            return None
        tables, ctx_len = batch.take("tables", kept), batch.take("ctx_len", kept)
        return decode_layer(block, x, cos, sin, *self.cache.in_place(slot), index, keep, tables, ctx_len,
                            self.cache.block_size)

    def _in_place(self, q: Tensor | None, num_keys: int) -> bool:
        """Whether decode rows with queries q attend on the cache in place (`paged_decode`)."""
        return q is not None and q.dtype == self.cache.k.dtype and decode_in_place(q, self.cfg.n_kv_heads, num_keys)

    def _attend_per_sequence(self, q: Tensor, rows: Tensor, slot: int, batch: _Batch) -> Tensor:
        """Attention outputs (n, H, D) of rows with queries q (n, H, D), each sequence over exactly its own
        context. Padding every sequence to the longest (one call) would cost a 1024-token prefill's
        attention once per decode row beside it, and one call per sequence costs a 16-prompt step 480
        calls. So the calls are batched where that wastes little:
          - where causal rows run on the flash kernel (`flash`: AMX tiles or AVX-512 BF16), every whole
            prompt and whole chunk after cached context in one call over the cache in place, with no
            padding (`flash_paged_attention`);
          - else whole chunks from position 0 (prompts) in one causal call per length bucket
            (`CAUSAL_BLOCK` multiples): a shorter prompt's padded keys sit past all of its real
            queries, so the causal mask hides them, and its padded queries are dropped;
          - single rows (decode rows of a mixed step) in one call, each over the keys up to itself;
            where that call reads the cache in place (`paged_decode`), a prompt's last rows past its
            whole blocks join it too, when they are at most PROMPT_TAIL_ROWS: a 134-token prompt
            then runs one causal block and 6 single rows, not a second block of 128 padded queries;
          - else a whole chunk after cached context in its own causal call (its queries the last of the keys);
          - a subset of a chunk's rows in its own masked call."""
        bs, Hkv = self.cache.block_size, self.cfg.n_kv_heads
        present, counts = torch.unique_consecutive(batch.seq[rows], return_counts=True)  # rows of a sequence are contiguous
        out = empty_rows((len(q), q.shape[1] * q.shape[2]), q).view(q.shape)  # it feeds the output projection
        prompts: dict[int, list[tuple[int, int]]] = {}  # length bucket -> (rows start, rows)
        singles: list[int] = []  # rows
        flashed: list[tuple[int, int, int, int]] = []  # (sequence, rows start, rows, context) for the flash kernel
        tails = self._in_place(q, batch.tables.shape[1] * bs)  # prompt tails may join the single rows
        flash = q.dtype == self.cache.k.dtype == torch.bfloat16  # the flash kernel may read the cache in place
        at = 0
        for i, n in zip(present.tolist(), counts.tolist()):
            ctx, whole = batch.starts[i] + batch.lengths[i], n == batch.lengths[i]
            if n == 1:
                singles.append(at)
            elif whole and flash and causal_kernel(q, Hkv, n, ctx) == "flash":
                flashed.append((i, at, n, ctx))
            elif whole and batch.starts[i] == 0:  # a whole prompt: causal from the top left
                blocks = n - n % CAUSAL_BLOCK
                if tails and blocks and n - blocks <= PROMPT_TAIL_ROWS:
                    prompts.setdefault(blocks // CAUSAL_BLOCK, []).append((at, blocks))
                    singles += range(at + blocks, at + n)
                else:
                    prompts.setdefault(-(-n // CAUSAL_BLOCK), []).append((at, n))
            else:  # all of a chunk after cached context (causal), or a subset of a chunk's rows (masked)
                k, v = self.cache.gather(slot, batch.tables[i : i + 1, : -(-ctx // bs)])
                k, v = k[:, :, :ctx].to(q.dtype), v[:, :, :ctx].to(q.dtype)
                mask = None
                if not whole:
                    key_pos = torch.arange(ctx, device=self.device)
                    mask = key_pos[None, None, :] <= batch.positions[rows[at : at + n]][None, :, None]
                q_seq = q[at : at + n].transpose(0, 1)[None]
                out[at : at + n] = attend(q_seq, k, v, mask, causal=mask is None)[0].transpose(0, 1)
            at += n
        if flashed:
            seq, starts, lengths, ctx = (list(t) for t in zip(*flashed))
            flash_paged_attention(q, *self.cache.in_place(slot), batch.tables[seq], starts, lengths, ctx, bs, out)
        for group in prompts.values():
            self._attend_prompts(q, rows, slot, batch, group, out)
        if singles:
            out[singles] = self._attend_singles(q, rows, slot, batch, singles)
        return out

    def _attend_prompts(self, q: Tensor, rows: Tensor, slot: int, batch: _Batch, group: list[tuple[int, int]],
                        out: Tensor) -> None:
        """Whole prompts (rows start, length) as one causal call padded to the longest, into out's rows."""
        L = max(n for _, n in group)
        seqs = batch.seq[rows[[at for at, _ in group]]]
        k, v = self.cache.gather(slot, batch.tables[seqs, : -(-L // self.cache.block_size)])
        k, v = k[:, :, :L].to(q.dtype), v[:, :, :L].to(q.dtype)  # past a prompt's length: other positions, unseen
        q_pad = q.new_zeros(len(group), L, *q.shape[1:])
        for j, (at, n) in enumerate(group):
            q_pad[j, :n] = q[at : at + n]
        res = attend(q_pad.transpose(1, 2), k, v, causal=True).transpose(1, 2)  # (R, L, H, D)
        for j, (at, n) in enumerate(group):
            out[at : at + n] = res[j, :n]

    def _attend_singles(self, q: Tensor, rows: Tensor, slot: int, batch: _Batch, at: list[int]) -> Tensor:
        """Single rows (at these indices of rows) as one call, each over its context up to its position: (R, H, D)."""
        idx = torch.tensor(at, device=self.device)
        row_ids = rows[idx]
        tables = batch.tables[batch.seq[row_ids]]
        if self._in_place(q, tables.shape[1] * self.cache.block_size):
            ctx_len = batch.positions[row_ids] + 1  # each over the keys up to itself
            return paged_decode(q[idx], *self.cache.in_place(slot), tables, ctx_len, self.cache.block_size)
        k, v = self.cache.gather(slot, tables)
        key_pos = torch.arange(tables.shape[1] * self.cache.block_size, device=self.device)
        mask = (key_pos[None, :] <= batch.positions[row_ids][:, None])[:, None]  # (R, 1, L)
        return attend(q[idx][:, :, None], k.to(q.dtype), v.to(q.dtype), mask)[:, :, 0]  # (R, H, D)

    # ----- outputs -----

    def _outputs(self, seqs: list[SeqInput], h: Tensor, depth: Tensor, path: Tensor, all_logits: bool) -> list[SeqOutput]:
        lengths = [len(s.token_ids) for s in seqs]
        ends = torch.cumsum(torch.tensor(lengths), 0).tolist()
        every = [all_logits or s.all_logits for s in seqs]
        spans = [(end - n, end) if e else (end - 1, end) for n, end, e in zip(lengths, ends, every)]
        rows = torch.cat([torch.arange(a, b) for a, b in spans]).to(self.device)
        logits = self._logits(h[rows])
        out, start, at = [], 0, 0
        depths = depth.tolist()
        for (a, b), end in zip(spans, ends):
            out.append(SeqOutput(logits=logits[at : at + b - a], depths=depths[start:end], paths=path[start:end]))
            start, at = end, at + b - a
        return out
