"""Per-request parameters: sampling, and compute (budget, depth bounds, price). Validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


class ParamError(ValueError):
    """A request parameter is out of range; `param` names the field (HTTP 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class StructuredOutputs:
    """A constraint on the output, as vLLM's `structured_outputs`: set exactly one of
    json (a JSON schema, as JSON text), json_object (any JSON object), regex (the whole output
    matches it) or choice (the output is one of these strings). The Validator checks and compiles
    it once (runtime/engine/grammar.py); the engine masks every step's logits to what it allows
    and stops the request when it is complete."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    source: str | None = None  # the request field it came from (e.g. "guided_regex"), named in errors

    def kind(self) -> str:
        """The one field that is set; ParamError unless exactly one is."""
        given = [name for name, value in (("json", self.json is not None), ("json_object", self.json_object),
                                          ("regex", self.regex is not None), ("choice", self.choice is not None))
                 if value]
        if len(given) != 1:
            raise ParamError(self.source or "structured_outputs", f"sets {given or 'nothing'}; set exactly one of "
                                                                  f"json, json_object, regex or choice")
        return given[0]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # reproducible per request
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-N logprobs per generated token (0: only the chosen token's)
    prompt_logprobs: int | None = None  # top-N logprobs of each prompt token given the ones before it
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputs | None = None  # a grammar the output must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "must be -1, 0 (off) or a positive integer"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "must be an integer in [0, max_tokens]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
            ("n", isinstance(self.n, int) and 1 <= self.n <= 16, "must be an integer in [1, 16]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
             "must be up to 16 non-empty strings"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("logit_bias", isinstance(self.logit_bias, dict) and len(self.logit_bias) <= 1024
             and all(isinstance(t, int) and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()),
             "must map at most 1024 token ids to biases in [-100, 100]"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ParamError(name, f"{getattr(self, name)!r} {message}")
        if self.structured_outputs is not None and self.min_tokens:
            raise ParamError("min_tokens", f"{self.min_tokens} cannot be combined with structured outputs: the grammar "
                                           f"decides where the output ends; leave min_tokens at 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# reasoning_effort (as OpenAI clients send it) -> (compute_budget, thought cap as a multiple of the
# checkpoint's default_thought_tokens). None keeps the default: the server's default budget, and the
# cap round(compute_budget * default_thought_tokens). An explicit compute_budget or max_thought_tokens
# wins over the effort's value for that field; the effort still sets the other.
REASONING_EFFORT: dict[str, tuple[float | None, float | None]] = {
    "none": (0.25, 0.0),  # no thoughts (</think> is forced at once), a quarter of the depth
    "minimal": (0.25, 0.25),
    "low": (0.5, 0.5),
    "medium": (None, None),  # what a request without reasoning_effort gets (OpenAI's default effort)
    "high": (1.0, 2.0),  # full depth; the cap lets the model think up to twice its trained length
    "xhigh": (1.0, 4.0),
}


@dataclass
class ComputeParams:
    """compute_budget: target mean core depth as a fraction of max_depth, in (0, 1].
    exit_price overrides it with a raw price; min_depth / max_depth bound every token.

    Thoughts (tokens between <think> and </think>): max_thought_tokens caps them per request by
    forcing </think> (default: round(compute_budget * the checkpoint's default_thought_tokens));
    include_thoughts returns them as reasoning_content; thought_kv is 'keep' or 'discard'
    (default: the checkpoint's first listed mode).

    reasoning_effort sets the budget and the thought cap together (REASONING_EFFORT); explicit
    compute_budget and max_thought_tokens win over it."""

    compute_budget: float | None = None
    min_depth: int | None = None
    max_depth: int | None = None
    exit_price: float | None = None
    max_thought_tokens: int | None = None
    include_thoughts: bool = False
    thought_kv: str | None = None
    reasoning_effort: str | None = None

    def validate(self, model_max_depth: int, thought_kv_modes: list[str] | None = None) -> None:
        """thought_kv_modes: the modes the checkpoint was trained for (None: only 'keep')."""
        if self.compute_budget is not None and not 0.0 < self.compute_budget <= 1.0:
            raise ParamError("compute_budget", f"{self.compute_budget!r} must be in (0, 1]")
        if self.exit_price is not None and not self.exit_price >= 0.0:
            raise ParamError("exit_price", f"{self.exit_price!r} must be >= 0")
        for name in ("min_depth", "max_depth"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= model_max_depth):
                raise ParamError(name, f"{value!r} must be an integer in [0, {model_max_depth}] for this model")
        if self.min_depth is not None and self.max_depth is not None and self.min_depth > self.max_depth:
            raise ParamError("min_depth", f"{self.min_depth} must be <= max_depth={self.max_depth}")
        if self.max_thought_tokens is not None and not (
                isinstance(self.max_thought_tokens, int) and self.max_thought_tokens >= 0):
            raise ParamError("max_thought_tokens", f"{self.max_thought_tokens!r} must be an integer >= 0")
        if not isinstance(self.include_thoughts, bool):
            raise ParamError("include_thoughts", f"{self.include_thoughts!r} must be true or false")
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORT:
            raise ParamError("reasoning_effort", f"{self.reasoning_effort!r} must be one of {list(REASONING_EFFORT)}")
        modes = thought_kv_modes or ["keep"]
        if self.thought_kv is not None and self.thought_kv not in modes:
            raise ParamError("thought_kv", f"{self.thought_kv!r} is not supported by this checkpoint, which was trained "
                                           f"for {modes}; use one of those")


def fan_out(sampling: SamplingParams) -> list[SamplingParams]:
    """The n sequences of a request, one SamplingParams each: seeds seed, seed + 1, ... when seeded."""
    return [replace(sampling, n=1, seed=None if sampling.seed is None else sampling.seed + j) for j in range(sampling.n)]
