"""Every request is validated here, once, into a `ValidRequest`; the engine core takes it as it is.

The checks need only what the core publishes about itself (`CoreInfo`), so the server process
validates without the model: the same `Validator` serves `LLM` and `ponder serve`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from runtime.engine.grammar import compile_grammar
from runtime.engine.params import REASONING_EFFORT, ComputeParams, ParamError, SamplingParams
from runtime.engine.thoughts import thought_cap


class RequestTooLongError(ParamError):
    """The request can never be served by this engine (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__("prompt", message)


@dataclass
class CoreInfo:
    """What a running engine core says of itself: the model's and the engine's limits."""

    max_depth: int
    min_depth: int
    n_pool: int
    vocab_size: int
    eos_id: int | None
    think_start_id: int | None
    think_end_id: int | None
    default_thought_tokens: int | None
    thought_kv_modes: list[str]  # the modes the checkpoint was trained for; the first is the default
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_waiting: int
    default_compute_budget: float
    budget_quality: list[dict[str, float]] = field(default_factory=list)  # calibration.json's measured cost per budget
    budget_quality_measured_on: str = ""


@dataclass
class ValidRequest:
    """A request that passed every check, with every default resolved: n == 1, a seed, a compute
    budget, a thought cap (None: uncapped) and mode, and the stop ids (EOS unless ignore_eos).
    With structured outputs, `grammar` is the compiled constraint (llguidance's grammar text)."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    compute: ComputeParams
    stop_ids: list[int] = field(default_factory=list)
    grammar: str | None = None

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens


class Validator:
    def __init__(self, info: CoreInfo) -> None:
        self.info = info
        self._seeds = random.Random()

    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams,
                 compute: ComputeParams | None = None) -> ValidRequest:
        """Raises ParamError (RequestTooLongError for what no setting of this engine could serve)."""
        info = self.info
        compute = compute or ComputeParams()
        compute.validate(info.max_depth, info.thought_kv_modes)
        if sampling.n != 1:
            raise ParamError("n", "one ValidRequest is one sequence; fan n > 1 out with params.fan_out()")
        if not prompt_token_ids:
            raise ParamError("prompt", "is empty; give at least one token")
        if any(not (isinstance(t, int) and 0 <= t < info.vocab_size) for t in prompt_token_ids):
            raise ParamError("prompt", f"has token ids outside the vocabulary [0, {info.vocab_size})")
        for name in ("stop_token_ids", "logit_bias"):
            if any(not 0 <= t < info.vocab_size for t in getattr(sampling, name)):
                raise ParamError(name, f"has token ids outside the vocabulary [0, {info.vocab_size})")
        self.check_fits(len(prompt_token_ids), sampling.max_tokens)
        grammar = compile_grammar(sampling.structured_outputs) if sampling.structured_outputs is not None else None
        effort_budget, effort_scale = REASONING_EFFORT.get(compute.reasoning_effort, (None, None))
        budget = next(b for b in (compute.compute_budget, effort_budget, info.default_compute_budget) if b is not None)
        cap = thought_cap(compute.max_thought_tokens, budget, info.default_thought_tokens, effort_scale)
        compute = replace(compute, compute_budget=budget, thought_kv=compute.thought_kv or info.thought_kv_modes[0],
                          max_thought_tokens=cap)
        seed = sampling.seed if sampling.seed is not None else self._seeds.getrandbits(63)
        stop_ids = sorted(set(sampling.stop_token_ids) | (
            {info.eos_id} if info.eos_id is not None and not sampling.ignore_eos else set()))
        return ValidRequest(list(prompt_token_ids), replace(sampling, seed=seed), compute, stop_ids, grammar)

    def check_fits(self, num_prompt: int, max_tokens: int) -> None:
        """Raise RequestTooLongError unless such a request fits max_model_len and the whole KV cache."""
        info = self.info
        if num_prompt + max_tokens > info.max_model_len:
            raise RequestTooLongError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds max_model_len="
                f"{info.max_model_len}; shorten the prompt or lower max_tokens")
        # The last output token is never run, so a request holds KV for at most this many positions.
        num_blocks = -(-(num_prompt + max_tokens - 1) // info.block_size)
        if num_blocks > info.num_kv_blocks:
            raise RequestTooLongError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) needs {num_blocks} KV blocks but the "
                f"cache has only {info.num_kv_blocks}; shorten the prompt, lower max_tokens or give the cache "
                f"more memory")
