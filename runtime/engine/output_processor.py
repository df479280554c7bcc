"""The output processor: token news from the engine core -> text, for `LLM` and the server alike.

Per request it detokenizes content and thoughts incrementally, applies stop strings (holding back
a tail that might still become one), and accumulates the whole sequence in a `CompletionOutput`.
A stop-string hit is the one thing that goes back to the core: the request is returned for abort.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.engine.outputs import EngineCoreOutput, FinishReason, Sampled
from runtime.engine.validation import ValidRequest


@dataclass
class CompletionOutput:
    """One generated sequence, accumulated so far."""

    index: int
    prompt_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    exit_depths: list[int] = field(default_factory=list)
    logprobs: list[Sampled] = field(default_factory=list)
    hidden: list[bool] = field(default_factory=list)  # per token: a thought or a thought marker
    reasoning_text: str = ""  # the thoughts, with ComputeParams(include_thoughts=True)
    num_thought_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    mean_depth: float = 0.0  # over every position run for this sequence, prompt included
    prompt_logprobs: list[Sampled] | None = None  # with prompt_logprobs: one per prompt token after the first
    prompt_depths: list[int] | None = None  # the exit depth of the position that scored each


@dataclass
class RequestOutput:
    """What one step produced for one sequence (the delta), and the sequence so far (`output`)."""

    request_id: str
    output: CompletionOutput
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    exit_depths: list[int] = field(default_factory=list)  # core depth of the position that gave each new token
    logprobs: list[Sampled] = field(default_factory=list)
    hidden: list[bool] = field(default_factory=list)
    new_reasoning_text: str = ""  # new thought text, only with include_thoughts
    num_new_thought_tokens: int = 0
    prompt_logprobs: list[Sampled] | None = None  # once, on the output that ends the prefill
    queue_time: float | None = None  # on the first output
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _RequestState:
    def __init__(self, request_id: str, valid: ValidRequest, index: int, tokenizer) -> None:
        self.request_id, self.stop = request_id, valid.sampling.stop
        self.stop_ids = set(valid.stop_ids)
        self.include_thoughts = valid.compute.include_thoughts
        self.wants_prompt_logprobs = valid.sampling.prompt_logprobs is not None
        self.visible = IncrementalDetokenizer(tokenizer)  # content tokens (stop ids excluded)
        self.thoughts = IncrementalDetokenizer(tokenizer)
        self.output = CompletionOutput(index, list(valid.prompt_token_ids))
        self.prompt_logprobs: list[Sampled] = []
        self.prompt_depths: list[int] = []
        self.num_reasoning_chars = 0  # of the thoughts' text, emitted so far

    def update(self, core: EngineCoreOutput) -> RequestOutput | None:
        seq = self.output
        if core.prompt_scores is not None:
            self.prompt_logprobs += core.prompt_scores.logprobs
            self.prompt_depths += core.prompt_scores.depths
        if not core.new_token_ids and not core.finished:
            return None  # a prefill chunk: its prompt scores go out with the first token
        out = RequestOutput(self.request_id, seq, list(core.new_token_ids), exit_depths=list(core.new_depths),
                            logprobs=list(core.new_logprobs), hidden=list(core.hidden), queue_time=core.queue_time,
                            finish_reason=core.finish_reason, error=core.error)
        if self.wants_prompt_logprobs and seq.prompt_logprobs is None:
            seq.prompt_logprobs = out.prompt_logprobs = self.prompt_logprobs
            seq.prompt_depths = self.prompt_depths
        for token, hidden, thought in zip(core.new_token_ids, core.hidden, core.thought):
            if not hidden and token not in self.stop_ids:
                self.visible.append(token)
            elif thought:
                self.thoughts.append(token)
                out.num_new_thought_tokens += 1
            if hidden and self.include_thoughts:  # at a marker or the end, a held-back tail is flushed too
                self._emit_reasoning(out, ended=not thought or core.finished)
        if core.finished and self.include_thoughts:
            self._emit_reasoning(out, ended=True)
        self._emit_text(out)
        seq.token_ids += out.new_token_ids
        seq.exit_depths += out.exit_depths
        seq.logprobs += out.logprobs
        seq.hidden += out.hidden
        seq.reasoning_text += out.new_reasoning_text
        seq.num_thought_tokens, seq.mean_depth = core.num_thought_tokens, core.mean_depth
        seq.finish_reason, seq.error = out.finish_reason, out.error
        return out

    def _emit_reasoning(self, out: RequestOutput, ended: bool) -> None:
        reasoning = self.thoughts.final_text() if ended else self.thoughts.text
        out.new_reasoning_text += reasoning[self.num_reasoning_chars :]
        self.num_reasoning_chars = len(reasoning)

    def _emit_text(self, out: RequestOutput) -> None:
        """New content text: up to a stop string (which finishes the sequence), holding back a tail that
        might still become one; everything at the end."""
        seq = self.output
        text = self.visible.final_text() if out.finished else self.visible.text
        emitted = len(seq.text)
        if out.finish_reason is not FinishReason.STOP and self.stop:
            hits = [text.find(s, max(0, emitted - len(s))) for s in self.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                text, out.finish_reason = text[: min(hits)], FinishReason.STOP
        if out.finished:
            ready = len(text)
        else:
            ready = max(emitted, len(text) - max(len(s) - 1 for s in self.stop)) if self.stop else len(text)
        out.new_text = text[emitted:ready]
        seq.text += out.new_text


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, valid: ValidRequest, index: int = 0) -> CompletionOutput:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use; give each request a unique id")
        state = self.requests[request_id] = _RequestState(request_id, valid, index, self.tokenizer)
        return state.output

    def abort(self, request_id: str) -> CompletionOutput | None:
        """Forget a request; returns its sequence so far (None if unknown or finished)."""
        state = self.requests.pop(request_id, None)
        return state.output if state is not None else None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The request outputs of one core step, and the requests a stop string finished, which the
        core must abort. Outputs of requests no longer here (aborted meanwhile) are dropped."""
        results, to_abort = [], []
        for core in outputs:
            state = self.requests.get(core.request_id)
            out = state.update(core) if state is not None else None
            if out is None:
                continue
            results.append(out)
            if out.finished:
                del self.requests[core.request_id]
                if not core.finished:
                    to_abort.append(core.request_id)
        return results, to_abort
