"""One engine iteration over many sequences, with per-token depth.

The tokens of all scheduled chunks are flattened into one batch of N rows. Then:
  - the prelude runs for all rows;
  - core step s runs only the rows still active: the exit head decides per row (each row
    carries its request's price and depth bounds); rows that exit write their deeper KV
    slots by `kv_fill`; the rest are grouped by chosen block, and each group is one
    gather -> block call -> scatter. The cost of a step scales with its active rows;
  - the coda and head run on each row's exit state.
Attention reads the paged cache: every row's slot-s entry is written before step s attends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.engine.kv_cache import PagedKVCache
from runtime.layers import Block, rope_tables
from runtime.model import PonderModel

Layer = tuple[str, int]  # ("prelude", i), ("pool", b) or ("coda", i)


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
    ctx_index: Tensor  # (S, Lmax) flat cache positions of each sequence's context, padded with 0
    ctx_len: Tensor  # (S,)
    cos: Tensor  # (N, D)
    sin: Tensor
    one_row_per_seq: bool  # a pure decode step


class Executor:
    def __init__(self, model: PonderModel, cache: PagedKVCache) -> None:
        self.model, self.cache, self.cfg = model, cache, model.cfg
        self.device = next(model.parameters()).device
        self.num_block_calls = 0  # core block applications (row-level), for accounting

    @torch.inference_mode()
    def run(self, seqs: list[SeqInput], all_logits: bool = False) -> list[SeqOutput]:
        cfg, D = self.cfg, self.cfg.max_depth
        batch = self._batch(seqs)
        N = len(batch.positions)
        ids = torch.tensor([t for s in seqs for t in s.token_ids], device=self.device)
        price, lo, hi, forced = self._exit_rows(seqs)
        # The first step at which some row could exit by price; before it the exit head is skipped.
        priced = [cfg.min_depth if q.min_depth is None else q.min_depth for q in seqs if q.price is not None]
        first_priced_step = min(priced, default=D)

        h = self._embed(ids)
        for layer in range(cfg.n_prelude):
            h = self._layer(("prelude", layer), h, self.cache.prelude_slot(layer), batch)

        depth = torch.zeros(N, dtype=torch.long, device=self.device)
        path = torch.full((N, D), -1, dtype=torch.long, device=self.device)
        active = torch.arange(N, device=self.device)
        exited = active[:0]  # rows that left the core; their slot-s entries follow kv_fill
        for s in range(D):
            if len(active):
                h_step, score = self._gate(h[active], s, need_score=s >= first_priced_step)
                stop = (s >= hi[active]) | (s >= forced[active])
                if score is not None:
                    stop |= (s >= lo[active]) & (score < price[active])
                if stop.any():
                    exited = torch.cat([exited, active[stop]])
                    active, h_step = active[~stop], h_step[~stop]
            if len(exited):  # one batched fill per step for every row exited so far
                self._fill(exited, h[exited], s, batch)
            if len(active) == 0:
                continue  # no block runs, but deeper slots of exited rows still get filled
            choice = self._choose(h_step, s)
            groups = [(("pool", b), active[sel], h_step[sel]) for b, sel in
                      ((b, choice == b) for b in sorted(set(choice.tolist())))]
            slot = self.cache.core_slot(s)
            if not (cfg.kv_fill == "shared" and s > 0):
                for layer, rows, x in groups:  # every row's slot-s entry before anyone attends
                    self._write_kv(layer, x, rows, slot, batch)
            for layer, rows, x in groups:
                h[rows] = self._attend_ff(layer, x, rows, slot, batch)
                path[rows, s] = layer[1]
                depth[rows] += 1
                self.num_block_calls += len(rows)

        h = self._adapt(h, depth)
        for layer in range(cfg.n_coda):
            h = self._layer(("coda", layer), h, self.cache.coda_slot(layer), batch)
        return self._outputs(seqs, h, depth, path, all_logits)

    # ----- compute: the only methods that touch weights (an ONNX backend overrides them) -----

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.embed(ids)

    def _gate(self, h: Tensor, s: int, need_score: bool) -> tuple[Tensor, Tensor | None]:
        """The step input h + P(s) of rows h (n, d), and their exit scores if needed."""
        h_step = self.model.step_input(h, s)
        return h_step, self.model.exit_score(h_step, s) if need_score else None

    def _route_logits(self, h_step: Tensor) -> Tensor:
        return self.model.route_logits(h_step)

    def _block(self, layer: Layer, x: Tensor) -> tuple[Block, Tensor]:
        """The block of a layer and its input: a pool block adds its block embedding to h_step."""
        kind, i = layer
        if kind == "pool":
            return self.model.pool[i], self.model.block_input(x, i)
        return getattr(self.model, kind)[i], x

    def _kv(self, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The slot entries k, v (n, Hkv, D) that rows with input x (n, d) write."""
        block, x = self._block(layer, x)
        k, v = block.kv(x[None], cos, sin)  # (1, Hkv, n, D)
        return k[0].transpose(0, 1), v[0].transpose(0, 1)

    def _block_padded(self, layer: Layer, x: Tensor, x_pad: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                      mask: Tensor, unpad: tuple[Tensor, Tensor]) -> Tensor:
        """The layer on rows x (n, d), also given padded per sequence as x_pad (R, M, d), attending to
        k, v (R, Hkv, L, D) under mask (R, M, L); x_pad[unpad] == x. Returns (n, d)."""
        block, x = self._block(layer, x)
        _, x_pad = self._block(layer, x_pad)
        out = block.attn(block.attn_norm(x_pad), k, v, cos[:, None], sin[:, None], mask[:, None])
        return block.feedforward(x + out[unpad])  # the MLP on real rows only

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
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], device=dev)
        key_pos = torch.arange(int(ctx_len.max()), device=dev)
        ctx = tables[:, key_pos // bs] * bs + key_pos % bs  # (S, Lmax); padding is masked by position
        seq_ids = torch.repeat_interleave(torch.arange(len(seqs), device=dev), counts)
        pos = starts[seq_ids] + torch.arange(len(seq_ids), device=dev) - (torch.cumsum(counts, 0) - counts)[seq_ids]
        offsets = torch.tensor([s.position_offset for s in seqs], device=dev)
        cos, sin = rope_tables(pos + offsets[seq_ids], self.cfg.head_dim, self.cfg.rope_theta)  # cache order is causal order; RoPE keeps token positions
        return _Batch(pos, ctx[seq_ids, pos], seq_ids, ctx, ctx_len, cos, sin,
                      one_row_per_seq=all(len(s.token_ids) == 1 for s in seqs))

    def _exit_rows(self, seqs: list[SeqInput]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row price, min depth, max depth and forced depth (max_depth + 1 where none)."""
        cfg, price, lo, hi, forced = self.cfg, [], [], [], []
        for s in seqs:
            n = len(s.token_ids)
            price += [float("-inf") if s.price is None else s.price] * n
            lo += [cfg.min_depth if s.min_depth is None else s.min_depth] * n
            hi += [cfg.max_depth if s.max_depth is None else min(s.max_depth, cfg.max_depth)] * n
            forced += s.depths if s.depths is not None else [cfg.max_depth + 1] * n
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        return as_tensor(price, torch.float32), as_tensor(lo, torch.long), as_tensor(hi, torch.long), as_tensor(forced, torch.long)

    # ----- blocks over rows -----

    def _choose(self, h_step: Tensor, s: int) -> Tensor:
        if self.cfg.schedule != "routed":
            block = s if self.cfg.schedule == "fixed" else 0
            return torch.full((len(h_step),), block, dtype=torch.long, device=self.device)
        return self._route_logits(h_step).argmax(-1)

    def _write_kv(self, layer: Layer, x: Tensor, rows: Tensor, slot: int, batch: _Batch) -> None:
        """Write the slot entries of rows from their layer inputs x (n, d)."""
        k, v = self._kv(layer, x, batch.cos[rows], batch.sin[rows])
        self.cache.write(slot, batch.index[rows], k, v)

    def _layer(self, layer: Layer, h: Tensor, slot: int, batch: _Batch) -> Tensor:
        """A prelude or coda layer: every row writes its entry, then every row attends."""
        rows = torch.arange(len(h), device=self.device)
        self._write_kv(layer, h, rows, slot, batch)
        return self._attend_ff(layer, h, rows, slot, batch)

    def _attend_ff(self, layer: Layer, x: Tensor, rows: Tensor, slot: int, batch: _Batch) -> Tensor:
        """The layer on rows (inputs x: (n, d)) over their sequences' cached slot. Rows are padded per
        sequence into (R, M, d), so one attention call serves all of them."""
        seq = batch.seq[rows]
        if batch.one_row_per_seq:  # decode: every row is its own sequence, nothing to pad
            present, inverse = seq, torch.arange(len(rows), device=self.device)
            rank = torch.zeros_like(inverse)
            x_pad, pos_pad = x[:, None], batch.positions[rows][:, None]
            cos, sin = batch.cos[rows][:, None], batch.sin[rows][:, None]
        else:
            present, inverse, counts = torch.unique(seq, return_inverse=True, return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(len(rows), device=self.device) - starts[inverse]  # rows of a sequence are contiguous
            R, M = len(present), int(counts.max())
            x_pad = x.new_zeros(R, M, x.shape[-1])
            x_pad[inverse, rank] = x
            pos_pad = torch.zeros(R, M, dtype=torch.long, device=self.device)
            pos_pad[inverse, rank] = batch.positions[rows]
            cos = batch.cos.new_zeros(R, M, batch.cos.shape[-1])
            sin = torch.zeros_like(cos)
            cos[inverse, rank], sin[inverse, rank] = batch.cos[rows], batch.sin[rows]  # tables made once per step
        ctx = batch.ctx_index[present]
        lmax = int(batch.ctx_len[present].max())
        k, v = self.cache.gather(slot, ctx[:, :lmax])
        key_pos = torch.arange(lmax, device=self.device)
        mask = key_pos[None, None, :] <= pos_pad[:, :, None]  # causal within the context (R, M, L)
        return self._block_padded(layer, x, x_pad, k.to(x.dtype), v.to(x.dtype), cos, sin, mask, (inverse, rank))

    # ----- kv_fill for rows that exit before step s -----

    def _fill(self, rows: Tensor, h: Tensor, s: int, batch: _Batch) -> None:
        """Write core slot s for rows that exited at or before step s (h: their exit states)."""
        fill = self.cfg.kv_fill
        if fill == "shared" and s > 0:
            return  # the single core slot already holds their step-0 entry
        if fill == "latest" and s > 0:  # a copy of the deepest computed entry, passed down slot by slot
            self.cache.copy(self.cache.core_slot(s - 1), self.cache.core_slot(s), batch.index[rows])
            return
        # propagate (and slot 0 of a row that ran no step): the exit state through the slot's block
        h_step, _ = self._gate(h, s, need_score=False)
        choice = self._choose(h_step, s)
        for b in sorted(set(choice.tolist())):
            sel = choice == b
            self._write_kv(("pool", b), h_step[sel], rows[sel], self.cache.core_slot(s), batch)

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
