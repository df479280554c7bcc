"""OpenAI-shaped request bodies. Unknown fields are tolerated (and logged by the app), as in vLLM.

Only types are checked here; ranges are checked once, by the engine's parameters and Validator."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None  # token id (a string key in JSON) -> bias in [-100, 100]
    # Identifiers OpenAI documents as having no effect on the output: accepted and unused.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default"] | None = None  # one tier here
    # Ponder's compute parameters (the OpenAI SDK's extra_body).
    compute_budget: float | None = None
    min_depth: int | None = None
    max_depth: int | None = None
    exit_price: float | None = None
    max_thought_tokens: int | None = None
    include_thoughts: bool = False
    thought_kv: str | None = None
    # Reasoning, as OpenAI and vLLM clients send it: reasoning_effort sets compute_budget and the thought
    # cap (runtime/engine/params.py: REASONING_EFFORT); thinking_token_budget is max_thought_tokens and
    # include_reasoning=true is include_thoughts.
    reasoning_effort: str | None = None
    thinking_token_budget: int | None = None
    include_reasoning: bool | None = None
    # Structured outputs: OpenAI's response_format, and vLLM's extras (at most one of them).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # {"json": schema} | {"regex": ...} | {"choice": [...]}
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # refused (see NOT_IMPLEMENTED)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None  # refused unless it equals n (see NOT_IMPLEMENTED)
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Refused unless left at their no-op value (see NOT_IMPLEMENTED).
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    store: bool | None = None


# Fields of OpenAI's schemas that Ponder does not implement, with the values that ask for nothing
# (accepted) and why anything else is refused (HTTP 400 naming the field). Nothing is ignored silently.
NOT_IMPLEMENTED: dict[str, tuple[tuple, str]] = {
    "best_of": ((None,), "best_of is not supported; ask for n sequences and pick among them"),
    "suffix": ((None, ""), "insertion (a suffix after the completion) is not supported by these models"),
    "tools": ((None, []), "tool calling is not supported: no shipped model was trained for a tool-call format"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None, False), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "guided_grammar": ((None, ""), "grammars (EBNF, Lark) are not supported; use guided_json, guided_regex or "
                                   "guided_choice"),
    "verbosity": ((None,), "verbosity is not supported; use max_tokens"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "store": ((None, False), "stored completions are not supported"),
}


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
