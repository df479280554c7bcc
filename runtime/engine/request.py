"""The scheduler's view of a request: token ids and KV bookkeeping, nothing about sampling."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # evicted by recompute; back in the waiting queue
    FINISHED_STOPPED = "stop"  # the caller saw a stop token or string
    FINISHED_LENGTH = "length"  # reached max_tokens
    FINISHED_ABORTED = "abort"  # client went away
    FINISHED_ERROR = "error"  # the executor failed on it

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    }
)


@dataclass
class Request:
    """One sequence the scheduler tracks.

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
    max_tokens: int  # output tokens to generate at most
    arrival: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    discard_spans: list[tuple[int, int]] = field(default_factory=list)
    num_spans_discarded: int = 0
    num_discarded: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt; send at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_tokens={self.max_tokens} must be >= 1")

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
