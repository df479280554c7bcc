"""Thought-mode tracking for one sequence: which generated tokens are hidden thoughts.

A thought is the tokens between `<think>` and `</think>`. The markers and the thoughts are hidden
from the content; the thoughts (not the markers) are the reasoning and are what
`max_thought_tokens` counts and caps, summed over every thought of the request. At the cap the
next token is forced to `</think>`. A prompt that ends with `<think>` starts the request in a thought.

The default cap, when a request sets no max_thought_tokens, is

    round(compute_budget * default_thought_tokens)

with the checkpoint's `default_thought_tokens` (the length it was trained to think) and the
request's compute_budget (or the server default), so budget 1.0 allows the trained length and 0.5
half of it. Without `default_thought_tokens` there is no default cap; max_tokens still bounds
thoughts, which count as completion tokens. A request's reasoning_effort changes the multiple
(runtime/engine/params.py: REASONING_EFFORT).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class TokenKind(Enum):
    VISIBLE = "visible"
    THOUGHT = "thought"
    MARKER = "marker"  # <think> or </think>: hidden, not counted as a thought


def thought_cap(max_thought_tokens: int | None, compute_budget: float, default_thought_tokens: int | None,
                scale: float | None = None) -> int | None:
    """The request's thought cap (see the module docstring); `scale` (from reasoning_effort) replaces
    compute_budget as the multiple of default_thought_tokens, and 0 means no thoughts at all."""
    if max_thought_tokens is not None:
        return max_thought_tokens
    if scale == 0.0:
        return 0
    if default_thought_tokens is None:
        return None
    return round((compute_budget if scale is None else scale) * default_thought_tokens)


@dataclass
class ThoughtState:
    start_id: int | None
    end_id: int | None
    cap: int | None  # thought tokens allowed in the whole request; None: no cap
    in_thought: bool = False
    span_start: int = -1  # token index of the open <think>
    num_thought_tokens: int = 0

    @classmethod
    def for_prompt(cls, prompt: list[int], start_id: int | None, end_id: int | None, cap: int | None) -> ThoughtState:
        state = cls(start_id, end_id, cap)
        if start_id is not None and end_id is not None and prompt and prompt[-1] == start_id:
            state.in_thought, state.span_start = True, len(prompt) - 1
        return state

    @property
    def enabled(self) -> bool:
        return self.start_id is not None and self.end_id is not None

    def forced_token(self) -> int | None:
        """`</think>` when the cap is reached inside a thought, else None (sample freely)."""
        if self.in_thought and self.cap is not None and self.num_thought_tokens >= self.cap:
            return self.end_id
        return None

    @property
    def opened(self) -> bool:
        """A thought was opened, in the prompt or the output (it may be closed since)."""
        return self.span_start >= 0

    def is_content(self, token: int) -> bool:
        """Whether `token`, if it came next, would be content: not a thought and not a marker."""
        return not self.enabled or not (self.in_thought or token in (self.start_id, self.end_id))

    def observe(self, token: int, index: int) -> tuple[TokenKind, tuple[int, int] | None]:
        """Classify the token generated at sequence index `index`. When it closes a thought, also
        return the span [<think> index, </think> index) whose KV 'discard' drops."""
        if not self.enabled:
            return TokenKind.VISIBLE, None
        if self.in_thought:
            if token == self.end_id:
                self.in_thought = False
                return TokenKind.MARKER, (self.span_start, index)
            self.num_thought_tokens += 1
            return TokenKind.THOUGHT, None
        if token == self.start_id:
            self.in_thought, self.span_start = True, index
            return TokenKind.MARKER, None
        if token == self.end_id:  # a stray </think>: hidden, closes nothing
            return TokenKind.MARKER, None
        return TokenKind.VISIBLE, None
