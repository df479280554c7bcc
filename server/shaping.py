"""Request shaping: an HTTP body -> validated engine requests, one per sequence (prompt x n).

Every range and limit is checked once, by the engine's Validator; this module only turns the
OpenAI fields into engine parameters and defaults.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer

from runtime.engine.params import ComputeParams, SamplingParams, fan_out
from runtime.engine.validation import CoreInfo, ValidRequest, Validator
from server.chat import render_chat
from server.config import ServerConfig
from server.errors import APIError, api_error
from server.protocol import NOT_IMPLEMENTED

log = logging.getLogger("ponder.server")


class RequestShaper:
    def __init__(self, validator: Validator, tokenizer: Tokenizer, config: ServerConfig) -> None:
        self.validator, self.tokenizer, self.config = validator, tokenizer, config

    @property
    def info(self) -> CoreInfo:
        return self.validator.info

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def check_fields(self, body) -> None:
        """Refuse what is asked but not implemented; log fields outside OpenAI's schema (as vLLM does)."""
        for name, (no_op, why) in NOT_IMPLEMENTED.items():
            if name in type(body).model_fields and getattr(body, name) not in no_op:
                if name == "best_of" and body.best_of == body.n:
                    continue  # best of n, all n returned: what n alone does
                raise APIError(400, f"{name}: {why}", param=name)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed with stream=true", param="stream_options")
        if body.model_extra:
            log.warning("ignoring unknown request fields: %s", sorted(body.model_extra))

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer.encode(text).ids
        except Exception as e:  # a closed-vocabulary tokenizer (no unknown token) cannot encode the text
            raise APIError(400, f"{param}: this model's tokenizer cannot encode the text ({e})", param=param) from e

    def prompts(self, prompt) -> list[list[int]]:
        """The completions API's prompt: a string, a list of strings, token ids, or lists of them."""
        if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return [self.encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompt]

    def chat_prompt(self, messages) -> list[int]:
        return self.encode(render_chat(messages, self.config.chat_template), "messages")

    def default_max_tokens(self, prompts: list[list[int]], asked: int | None) -> int:
        """As in vLLM: what the context leaves after the longest prompt, unless the request asks."""
        return asked if asked is not None else max(1, self.info.max_model_len - max(len(p) for p in prompts))

    def params(self, body, max_tokens: int, logprobs: int | None,
               prompt_logprobs: int | None = None) -> tuple[SamplingParams, ComputeParams]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            sampling = SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                min_p=body.min_p, seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, max_tokens),
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                n=body.n, logit_bias=dict(body.logit_bias or {}),
            )
        except ValueError as e:
            raise api_error(e) from e
        compute = ComputeParams(compute_budget=body.compute_budget, min_depth=body.min_depth, max_depth=body.max_depth,
                                exit_price=body.exit_price, max_thought_tokens=body.max_thought_tokens,
                                include_thoughts=body.include_thoughts, thought_kv=body.thought_kv)
        return sampling, compute

    def sequences(self, prompts: list[list[int]], sampling: SamplingParams,
                  compute: ComputeParams) -> list[ValidRequest]:
        """Every sequence of the request (prompt i, sample j at index i * n + j), all validated before
        any is generated, so a bad one refuses the whole request."""
        try:
            return [self.validator.validate(ids, s, compute) for ids in prompts for s in fan_out(sampling)]
        except ValueError as e:
            raise api_error(e) from e
