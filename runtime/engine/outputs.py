"""What flows out of the engine core, as plain torch-free records (they cross the process boundary).

    Executor.execute(SchedulerOutput) -> ModelRunnerOutput       what the forward and sampler computed
    Scheduler.update_from_output(...) -> list[EngineCoreOutput]  what each request got this step
    OutputProcessor.process(...)      -> list[RequestOutput]     text, stop strings, accumulation
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a sequence ended; the values are the OpenAI API's finish_reason strings."""

    STOP = "stop"  # a stop id or stop string
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # the client went away, or the server shut down
    ERROR = "error"  # the executor failed on it, or the engine core died


@dataclass
class Sampled:
    token_id: int
    logprob: float  # raw model log-probability of the token
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class PromptScores:
    """Logprobs of the prompt tokens one chunk predicted (position p's logits score token p + 1)."""

    logprobs: list[Sampled]
    depths: list[int]  # the exit depth of the position that scored each


@dataclass
class ModelRunnerOutput:
    """What the executor returns for one `SchedulerOutput`."""

    sampled: dict[str, Sampled] = field(default_factory=dict)  # request_id -> token, for chunks with samples=True
    depths: dict[str, list[int]] = field(default_factory=dict)  # request_id -> core depth of each position run
    prompt_scores: dict[str, PromptScores] = field(default_factory=dict)  # with prompt_logprobs
    block_steps: list[int] = field(default_factory=list)  # block applications per pool block this step
    failed: dict[str, str] = field(default_factory=dict)  # request_id -> error message
    grammar_complete: list[str] = field(default_factory=list)  # structured outputs complete with this step's token


@dataclass
class EngineCoreOutput:
    """News of one request after a step: a new token, or that it finished (or both)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[Sampled] = field(default_factory=list)
    new_depths: list[int] = field(default_factory=list)  # core depth of the position whose logits gave each token
    hidden: list[bool] = field(default_factory=list)  # per new token: a thought or a thought marker
    thought: list[bool] = field(default_factory=list)  # per new token: a thought (markers are not)
    finish_reason: FinishReason | None = None
    error: str | None = None
    mean_depth: float = 0.0  # over every position the request ran (prompt and output)
    num_thought_tokens: int = 0  # so far in this request
    prompt_scores: PromptScores | None = None  # scores of prompt tokens computed this step
    queue_time: float | None = None  # seconds from arrival to first scheduling, on its first output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CoreStats:
    """Queue sizes, KV usage and compute accounting, for health and metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    core_steps: int = 0  # block applications that ran
    core_steps_full: int = 0  # what full depth would have run for the same positions
    block_steps: list[int] = field(default_factory=list)
