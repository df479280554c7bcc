"""The engine core's one record of a request: its tokens, its parameters, its budget controller,
its thought state, and the scheduler's KV bookkeeping. Plain Python, no torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from runtime.calibration import Calibration
from runtime.engine.budget import BudgetController
from runtime.engine.outputs import FinishReason
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.engine.thoughts import ThoughtState
from runtime.engine.validation import ValidRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # evicted by recompute; back in the waiting queue
    FINISHED_STOPPED = "stop"  # a stop id, or the output processor saw a stop string
    FINISHED_LENGTH = "length"  # reached max_tokens
    FINISHED_ABORTED = "abort"  # client went away
    FINISHED_ERROR = "error"  # the executor failed on it

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass(eq=False)
class Request:
    """One sequence the engine core serves.

    Cache positions 0..num_computed_tokens-1 have their KV in the blocks listed in
    `block_table`. Cache position c holds token c, except after thought spans were discarded:
    `discard_spans` lists token ranges [start, end) (a `<think>` and its thoughts, up to the
    `</think>` at `end`) whose KV is dropped once `</think>` is computed and the first visible
    token after it is known. The first `num_spans_discarded` spans are gone from the cache, and
    `num_discarded` tokens with them, so later tokens sit at cache position token - num_discarded
    (their RoPE position is still the token index). The last sampled token is not computed until
    the next decode step, so a running request always has num_computed_tokens < num_cache_tokens.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    budget: BudgetController = field(default_factory=lambda: BudgetController(ComputeParams(), Calibration.uncalibrated(), 1))
    thoughts: ThoughtState = field(default_factory=lambda: ThoughtState(None, None, None))
    stop_ids: frozenset[int] = frozenset()
    grammar: str | None = None  # structured outputs: the compiled constraint on the content (ValidRequest.grammar)
    arrival: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    discard_spans: list[tuple[int, int]] = field(default_factory=list)
    num_spans_discarded: int = 0
    num_discarded: int = 0
    num_prompt_scored: int = 0  # prompt positions whose logprobs were reported (a replay skips them)
    queue_time: float | None = None  # set when first scheduled

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, f"request {self.request_id!r} has an empty prompt"  # validated before

    @classmethod
    def from_valid(cls, request_id: str, valid: ValidRequest, calibration: Calibration, max_depth: int,
                   think_ids: tuple[int | None, int | None] = (None, None)) -> Request:
        compute = valid.compute
        budget = BudgetController(compute, calibration, max_depth)
        thoughts = ThoughtState.for_prompt(valid.prompt_token_ids, *think_ids, compute.max_thought_tokens)
        return cls(request_id, valid.prompt_token_ids, valid.sampling, compute, budget, thoughts, frozenset(valid.stop_ids),
                   valid.grammar)

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    @property
    def price(self) -> float | None:
        return self.budget.price

    @property
    def discards_thoughts(self) -> bool:
        return self.compute.thought_kv == "discard"

    @property
    def wants_prompt_scores(self) -> bool:
        return (self.sampling.prompt_logprobs is not None
                and self.num_prompt_scored < len(self.prompt_token_ids) - 1)

    def banned_ids(self) -> list[int]:
        """Stop ids may not be sampled before min_tokens."""
        return sorted(self.stop_ids) if len(self.output_token_ids) < self.sampling.min_tokens else []

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_cache_tokens(self) -> int:
        """Positions the cache holds once every token is computed."""
        return self.num_tokens - self.num_discarded

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
