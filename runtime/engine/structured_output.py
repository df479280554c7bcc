"""Structured outputs in the engine core: one llguidance matcher per constrained request, the
token bitmask of a step's constrained rows, and the tokens each matcher accepts.

The executor holds the manager and keys matchers by request id, as it keys the per-request
generators; a matcher is dropped when its request finishes. A matcher is advanced by each token
the sampler picks for its request, in the same step, so the scheduler can stop a request whose
grammar is complete. Preemption by recompute replays the prompt and the outputs already accepted,
and samples nothing new until it reaches the end, so the matcher simply waits.

The grammar constrains the content only: while a request is inside a thought its row is not
masked and the thought tokens and markers are not fed to the matcher. Until the first content
token or thought, `<think>` stays allowed for a checkpoint trained to think (one with
default_thought_tokens), so it may think (once) before it answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import llguidance
import torch
from tokenizers import Tokenizer
from torch import Tensor

from runtime.engine.grammar import token_table
from runtime.engine.request import Request


@dataclass
class _Entry:
    matcher: llguidance.LLMatcher
    num_content: int = 0  # content tokens accepted


class StructuredOutputManager:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_id: int | None, think_start_id: int | None) -> None:
        """think_start_id: the `<think>` to allow before the content (None: never allow it there)."""
        self.tokenizer, self.vocab_size, self.eos_id, self.think_start_id = tokenizer, vocab_size, eos_id, think_start_id
        self.num_words = (vocab_size + 31) // 32
        self._table: llguidance.LLTokenizer | None = None  # built on the first constrained request (~0.2 s)
        self._pool: llguidance.LLExecutor | None = None  # computes the batch's masks in parallel
        self._entries: dict[str, _Entry] = {}
        self.mask_seconds = 0.0  # spent building bitmasks, for benchmarks
        self.num_mask_steps = 0  # steps that built one
        self.num_masked_rows = 0

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._entries.pop(rid, None)

    def bitmask(self, requests: list[Request]) -> tuple[list[int], Tensor] | None:
        """The rows of `requests` (the step's sampling rows) masked this step and their bitmask
        (len(rows), ceil(V / 32)) int32, bit t of a row set where token t is allowed; None when no
        row is constrained now."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None and not r.thoughts.in_thought]
        if not rows:
            return None
        if self._table is None:
            self._table = token_table(self.tokenizer, self.vocab_size, self.eos_id)
            self._pool = llguidance.LLExecutor()
        start = time.perf_counter()
        entries = [self._entry(requests[i]) for i in rows]
        mask = torch.empty((len(rows), self.num_words), dtype=torch.int32)
        self._pool.unsafe_compute_mask_ptr([(e.matcher, k) for k, e in enumerate(entries)], mask.data_ptr(),
                                           self.num_words * 4, len(rows))
        if self.think_start_id is not None:  # a thinking model may open a thought before its first content token
            word, bit = divmod(self.think_start_id, 32)
            first = [k for k, (i, e) in enumerate(zip(rows, entries))
                     if e.num_content == 0 and requests[i].thoughts.enabled and not requests[i].thoughts.opened]
            if first:
                mask[first, word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)
        self.mask_seconds += time.perf_counter() - start
        self.num_mask_steps += 1
        self.num_masked_rows += len(rows)
        return rows, mask

    def accept(self, requests: list[Request], tokens: list[int]) -> tuple[list[str], dict[str, str]]:
        """Feed each constrained request the content token sampled for it. Returns the requests whose
        grammar is now complete (they stop) and those whose token broke it (they fail)."""
        complete, failed = [], {}
        for req, token in zip(requests, tokens):
            if req.grammar is None or not req.thoughts.is_content(token):
                continue
            entry = self._entry(req)
            if not entry.matcher.consume_token(token):
                failed[req.request_id] = f"structured outputs: token {token} breaks the grammar: {entry.matcher.get_error()}"
                continue
            entry.num_content += 1
            if entry.matcher.is_stopped():
                complete.append(req.request_id)
        return complete, failed

    def _entry(self, req: Request) -> _Entry:
        entry = self._entries.get(req.request_id)
        if entry is None:
            # The Validator compiled the grammar; should it still fail with the vocabulary, the matcher
            # is in an error state and its request fails in accept(), alone.
            matcher = llguidance.LLMatcher(self._table, req.grammar, log_level=0)
            entry = self._entries[req.request_id] = _Entry(matcher)
        return entry
