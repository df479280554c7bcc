"""The engine scheduler: waiting and running queues, a token budget per step, paged KV blocks.

Pure Python, no torch. The engine core's step is three calls (runtime/engine/core.py):

    scheduler_output = scheduler.schedule()
    runner_output = executor.execute(scheduler_output)
    outputs = scheduler.update_from_output(scheduler_output, runner_output)

Each step schedules running requests first (a decode is one token; a request still in
chunked prefill gets its next chunk), then admits waiting requests first come, first
served. When a running request cannot get a KV block, the most recently arrived running
request is preempted by recompute: its blocks are freed and it goes back to the front
of the waiting queue, to prefill prompt + outputs again later.

`update_from_output` applies what the executor computed: each position's depth to the request's
budget controller, sampled tokens to the outputs and the thought state, and it finishes requests
on a stop id, a complete grammar (structured outputs), at max_tokens or on failure. Only a stop
string (found in text, outside the core) comes back in from outside, as `finish()`.

Thought KV discard: when a sampled `</think>` closes a thought of a request with
thought_kv='discard', the span is registered (`discard_thought()`). Once its `</think>` is
computed and the token after it is known, the next `schedule()` drops the span from the
request's cache: the KV of the positions computed after the span (`</think>`) is moved down over
the span's start (`SchedulerOutput.kv_moves`, which the executor applies before anything runs),
and the blocks past the new end are freed, so the span returns whole blocks. A preempted request
replays its spans: prefill stops at each `</think>` so the span is dropped again before anything
later is computed, exactly as it was the first time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import time

from runtime.config import ConfigError
from runtime.engine.kv_blocks import BlockAllocator
from runtime.engine.outputs import EngineCoreOutput, ModelRunnerOutput
from runtime.engine.request import Request, RequestStatus
from runtime.engine.thoughts import TokenKind


@dataclass(kw_only=True)
class SchedulerConfig:
    """Limits of one engine. `num_kv_blocks` comes from the memory the executor could give the cache."""

    num_kv_blocks: int
    """Physical KV blocks in the cache; each holds `block_size` positions of every layer and slot."""
    max_model_len: int
    """Longest sequence served: prompt + max_tokens of a request must not exceed it."""
    max_num_seqs: int = 64
    """Most requests running (holding KV) at once."""
    max_num_batched_tokens: int = 2048
    """Token budget per step: prefill chunks plus decode tokens."""
    block_size: int = 16
    """Token positions per KV block."""
    max_waiting: int = 256
    """Most requests queued beyond the free running slots (0: none, a request is taken only into a free
    slot); past it `add_request` refuses at once with `OverloadedError`. The queue is what admitted
    requests wait behind: a short one keeps their latency near its value at capacity under overload."""
    long_prefill_token_threshold: int = 512
    """Largest prefill chunk one request runs per step; longer prompts are split."""

    def __post_init__(self) -> None:
        for name in (
            "num_kv_blocks",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "long_prefill_token_threshold",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigError(f"max_waiting={self.max_waiting!r} must be an integer >= 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs={self.max_num_seqs}, "
                f"so running requests could not all decode in one step; raise max_num_batched_tokens "
                f"or lower max_num_seqs"
            )


class OverloadedError(Exception):
    """The waiting queue is full; retry later (HTTP 429)."""


@dataclass
class ScheduledChunk:
    """Tokens of one request to run this step, at positions start_position.. onwards."""

    request: Request  # what the executor reads: sampling and compute parameters, the price, the history
    token_ids: list[int]
    start_position: int
    block_table: list[int]  # a copy; covers start_position + len(token_ids) positions
    samples: bool  # the chunk ends at the sequence's last known token: sample the next one
    position_offset: int = 0  # RoPE position = cache position + offset (tokens of discarded thoughts)

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    """What the executor runs this step."""

    scheduled: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)  # evicted this step; drop their state
    finished_ids: list[str] = field(default_factory=list)  # finished or aborted since the last step
    num_batched_tokens: int = 0
    kv_moves: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) flat cache positions, all slots


class Scheduler:
    """Decides which tokens of which requests run each step, and owns their KV blocks."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.allocator = BlockAllocator(config.num_kv_blocks, config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self._finished_ids: list[str] = []  # freed since the last schedule()
        self._pending: SchedulerOutput | None = None  # scheduled, awaiting update_from_output()

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, req: Request) -> None:
        """Queue a new (validated) request, or refuse it at once with `OverloadedError` when
        `max_waiting` requests already wait beyond the free running slots."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use; give each request a unique id")
        if req.status is not RequestStatus.WAITING or req.block_table or req.num_computed_tokens or req.discard_spans:
            raise ValueError(f"request {req.request_id!r} is not fresh (status {req.status.name}); add a new Request")
        assert self.allocator.num_blocks_for(req.num_tokens + req.max_tokens - 1) <= self.config.num_kv_blocks, \
            f"request {req.request_id!r} can never fit the KV cache; the Validator should have refused it"
        cfg = self.config
        if len(self.waiting) + len(self.running) >= cfg.max_num_seqs + cfg.max_waiting:
            raise OverloadedError(f"{len(self.running)} requests are running and {len(self.waiting)} waiting "
                                  f"(max_num_seqs={cfg.max_num_seqs}, max_waiting={cfg.max_waiting})")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if the id is unknown or finished."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_STOPPED) -> bool:
        """Finish a request (e.g. the caller saw a stop token) and free its blocks at once."""
        if not status.is_finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {status.name}")
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._finish(req, status)
        return True

    def discard_thought(self, request_id: str, start: int, end: int) -> None:
        """Drop the KV of tokens [start, end) (a `<think>` and its thoughts; token `end` is the
        `</think>`) once `</think>` is computed and the token after it is known."""
        req = self.requests[request_id]
        last = req.discard_spans[-1][1] if req.discard_spans else -1
        if not last < start < end < req.num_tokens:
            raise ValueError(f"thought span [{start}, {end}) of request {request_id!r} must follow the last one "
                             f"(ending at {last}) and close at a known token (< {req.num_tokens})")
        req.discard_spans.append((start, end))

    def get_request(self, request_id: str) -> Request | None:
        """The live (unfinished) request with this id, if any."""
        return self.requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return self.allocator.usage

    # ------------------------------------------------------------------ the step

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks, allocating KV blocks and preempting as needed.

        Every `schedule()` must be followed by one `update_from_output()`; if the executor
        raises, report each scheduled request in `ModelRunnerOutput.failed`.
        """
        if self._pending is not None:
            raise RuntimeError("schedule() called twice; call update_from_output() with the executor's result first")
        cfg = self.config
        chunks: dict[str, ScheduledChunk] = {}
        preempted_ids: list[str] = []
        budget = cfg.max_num_batched_tokens
        kv_moves = [move for req in self.running for move in self._discard_ready_spans(req)]

        # Running requests first: decodes and the next chunk of unfinished prefills.
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(self._num_computable(req), budget, cfg.long_prefill_token_threshold)
            assert num_new > 0, f"running request {req.request_id} has nothing to compute"
            num_needed = self.allocator.num_blocks_for(req.num_computed_tokens + num_new) - len(req.block_table)
            while num_needed > self.allocator.num_free:
                # add_request refused any request that could outgrow the whole cache on its own.
                assert len(self.running) > 1, f"request {req.request_id} outgrew the KV cache on its own"
                victim = max(reversed(self.running), key=lambda r: r.arrival)  # ties: the later admitted
                chunk = chunks.pop(victim.request_id, None)
                if chunk is not None:
                    budget += len(chunk.token_ids)
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue  # it preempted itself
            if num_needed > 0:
                req.block_table.extend(self.allocator.allocate(num_needed))
            chunks[req.request_id] = self._chunk(req, num_new)
            budget -= num_new

        # Then admit waiting requests in order, stopping at the first that does not fit.
        # After a preemption memory is tight, so admit nobody this step.
        while not preempted_ids and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            assert req.num_computed_tokens == 0 and not req.block_table
            num_new = min(self._num_computable(req), budget, cfg.long_prefill_token_threshold)
            num_needed = self.allocator.num_blocks_for(num_new)
            if num_needed > self.allocator.num_free:
                break
            self.waiting.popleft()
            req.block_table = self.allocator.allocate(num_needed)
            req.status = RequestStatus.RUNNING
            if req.queue_time is None:
                req.queue_time = time.monotonic() - req.arrival
            self.running.append(req)
            chunks[req.request_id] = self._chunk(req, num_new)
            budget -= num_new

        scheduled = list(chunks.values())
        out = SchedulerOutput(
            scheduled=scheduled,
            preempted_ids=preempted_ids,
            finished_ids=self._finished_ids,
            num_batched_tokens=sum(len(c.token_ids) for c in scheduled),
            kv_moves=kv_moves,
        )
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens and len(scheduled) <= cfg.max_num_seqs
        self._finished_ids = []
        self._pending = out
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Apply the executor's result for `scheduler_output`, the last `schedule()`.

        Advances each scheduled request's computed positions and feeds their depths to its budget
        controller; appends sampled tokens and sorts them into content and thought; finishes requests
        on a stop id (FINISHED_STOPPED), at max_tokens (FINISHED_LENGTH) or on failure
        (FINISHED_ERROR), and frees their blocks. Requests finished or aborted since `schedule()` are
        skipped. Returns one output per request that got a token, prompt scores, or finished.
        """
        if self._pending is not scheduler_output:
            raise RuntimeError("update_from_output() must get the SchedulerOutput of the last schedule()")
        for chunk in scheduler_output.scheduled:
            rid = chunk.request_id
            if rid not in self.requests or rid in output.failed:
                continue
            if chunk.samples != (rid in output.sampled):
                raise ValueError(f"the executor's sampled tokens do not match the schedule for request {rid!r} "
                                 f"(its chunk {'samples' if chunk.samples else 'does not sample'})")
        self._pending = None

        outputs: list[EngineCoreOutput] = []
        for chunk in scheduler_output.scheduled:
            req = self.requests.get(chunk.request_id)
            if req is None or chunk.request_id in output.failed:
                continue  # finished since schedule(), or failed (handled below)
            assert req.status is RequestStatus.RUNNING and req.num_computed_tokens == chunk.start_position
            req.num_computed_tokens += len(chunk.token_ids)
            assert req.num_computed_tokens <= len(req.block_table) * self.config.block_size
            depths = output.depths.get(req.request_id, [])
            req.budget.update(depths)
            out = EngineCoreOutput(req.request_id, prompt_scores=output.prompt_scores.get(req.request_id))
            if out.prompt_scores is not None:
                req.num_prompt_scored += len(out.prompt_scores.logprobs)
            if chunk.samples:
                self._append_token(req, output.sampled[req.request_id], depths[-1], out,
                                   complete=req.request_id in output.grammar_complete)
            if out.new_token_ids or out.prompt_scores is not None:
                out.mean_depth, out.num_thought_tokens = req.budget.mean_depth, req.thoughts.num_thought_tokens
                if out.new_token_ids and len(req.output_token_ids) == 1:  # the first token: metrics take it
                    out.queue_time = req.queue_time
                outputs.append(out)
        for rid, message in output.failed.items():
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, RequestStatus.FINISHED_ERROR)
                outputs.append(EngineCoreOutput(rid, finish_reason=req.status.finish_reason, error=message,
                                                mean_depth=req.budget.mean_depth,
                                                num_thought_tokens=req.thoughts.num_thought_tokens))
        return outputs

    def _append_token(self, req: Request, sampled, depth: int, out: EngineCoreOutput, complete: bool = False) -> None:
        """A sampled token: into the outputs and the thought state; finish on a stop id, when the token
        completes the request's grammar (`complete`, structured outputs) or at max_tokens."""
        token = sampled.token_id
        req.output_token_ids.append(token)
        kind, span = req.thoughts.observe(token, req.num_tokens - 1)
        out.new_token_ids, out.new_logprobs, out.new_depths = [token], [sampled], [depth]
        out.hidden, out.thought = [kind is not TokenKind.VISIBLE], [kind is TokenKind.THOUGHT]
        if token in req.stop_ids or complete:
            self._finish(req, RequestStatus.FINISHED_STOPPED)
        elif len(req.output_token_ids) >= req.max_tokens:
            self._finish(req, RequestStatus.FINISHED_LENGTH)
        elif span is not None and req.discards_thoughts:
            self.discard_thought(req.request_id, *span)
        out.finish_reason = req.status.finish_reason

    # ------------------------------------------------------------------ internals

    def _chunk(self, req: Request, num_new: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        end = start + num_new
        assert len(req.block_table) * self.config.block_size >= end
        offset = req.num_discarded  # every span before `start` is gone from the cache
        return ScheduledChunk(
            request=req,
            token_ids=req.all_token_ids[start + offset : end + offset],
            start_position=start,
            block_table=list(req.block_table),
            samples=end == req.num_cache_tokens,
            position_offset=offset,
        )

    def _num_computable(self, req: Request) -> int:
        """Positions the request may compute now: up to its last token, or up to the `</think>` of a
        span still to be dropped (so nothing after it is computed with the span in context)."""
        end = req.num_cache_tokens
        if req.num_spans_discarded < len(req.discard_spans):
            end = min(end, req.discard_spans[req.num_spans_discarded][1] - req.num_discarded + 1)
        return end - req.num_computed_tokens

    def _discard_ready_spans(self, req: Request) -> list[tuple[int, int]]:
        """Drop every span whose `</think>` is computed and whose next token is known; returns KV moves."""
        bs, moves = self.config.block_size, []
        flat = lambda c: req.block_table[c // bs] * bs + c % bs  # noqa: E731
        while req.num_spans_discarded < len(req.discard_spans):
            start, end = req.discard_spans[req.num_spans_discarded]
            c_start, c_end = start - req.num_discarded, end - req.num_discarded
            if req.num_computed_tokens <= c_end or req.num_tokens <= end + 1:
                break
            tail = req.num_computed_tokens - c_end  # computed positions from </think> on (1 unless replaying)
            moves += [(flat(c_end + i), flat(c_start + i)) for i in range(tail)]
            keep = self.allocator.num_blocks_for(c_start + tail)
            self.allocator.free(req.block_table[keep:])
            del req.block_table[keep:]
            req.num_computed_tokens = c_start + tail
            req.num_discarded += end - start
            req.num_spans_discarded += 1
        return moves

    def _preempt(self, req: Request) -> None:
        """Evict by recompute: free the blocks and requeue at the front; outputs are kept."""
        self.running.remove(req)
        self.allocator.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        req.num_discarded = req.num_spans_discarded = 0  # replayed: each span is dropped again
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.allocator.free(req.block_table)
        req.block_table = []
        req.status = status
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
