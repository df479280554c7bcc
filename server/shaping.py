"""Request shaping: an HTTP body -> validated engine requests, one per sequence (prompt x n).

Every range and limit is checked once, by the engine's Validator; this module only turns the
OpenAI fields into engine parameters and defaults.
"""

from __future__ import annotations

import json
import logging

from tokenizers import Tokenizer

from runtime.engine.params import ComputeParams, SamplingParams, StructuredOutputs, fan_out
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
                n=body.n, logit_bias=dict(body.logit_bias or {}), structured_outputs=structured_outputs(body),
            )
        except ValueError as e:
            raise api_error(e) from e
        thought_cap = body.max_thought_tokens
        if body.thinking_token_budget is not None:
            if body.thinking_token_budget < 0:
                raise APIError(400, f"thinking_token_budget: {body.thinking_token_budget} must be an integer >= 0",
                               param="thinking_token_budget")
            if thought_cap is not None and thought_cap != body.thinking_token_budget:
                raise APIError(400, f"thinking_token_budget ({body.thinking_token_budget}) and max_thought_tokens "
                                    f"({thought_cap}) disagree; give one of them", param="thinking_token_budget")
            thought_cap = body.thinking_token_budget
        compute = ComputeParams(compute_budget=body.compute_budget, min_depth=body.min_depth, max_depth=body.max_depth,
                                exit_price=body.exit_price, max_thought_tokens=thought_cap,
                                include_thoughts=include_thoughts(body), thought_kv=body.thought_kv,
                                reasoning_effort=body.reasoning_effort)
        return sampling, compute

    def sequences(self, prompts: list[list[int]], sampling: SamplingParams,
                  compute: ComputeParams) -> list[ValidRequest]:
        """Every sequence of the request (prompt i, sample j at index i * n + j), all validated before
        any is generated, so a bad one refuses the whole request."""
        try:
            return [self.validator.validate(ids, s, compute) for ids in prompts for s in fan_out(sampling)]
        except ValueError as e:
            raise api_error(e) from e


def include_thoughts(body) -> bool:
    """include_thoughts, or vLLM's include_reasoning=true."""
    return body.include_thoughts or bool(body.include_reasoning)


# vLLM's structured_outputs keys: the constraints supported here, and the options that may be sent at
# their no-op value only.
_CONSTRAINTS = ("json", "json_object", "regex", "choice")
_NO_OP_OPTIONS = ("grammar", "structural_tag", "whitespace_pattern", "disable_any_whitespace", "disable_fallback",
                  "disable_additional_properties", "backend")


def structured_outputs(body) -> StructuredOutputs | None:
    """The one output constraint a body asks for, from whichever field it used (OpenAI's response_format,
    vLLM's structured_outputs or guided_*); None for none. Its errors name that field."""
    given = []
    fmt = body.response_format
    if fmt is not None and fmt.get("type") != "text":
        kind = fmt.get("type")
        if kind == "json_object":
            given.append(StructuredOutputs(json_object=True, source="response_format"))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format: json_schema.schema must be a JSON schema object",
                               param="response_format")
            given.append(StructuredOutputs(json=json.dumps(schema), source="response_format"))
        else:
            raise APIError(400, f"response_format: type {kind!r} is not supported; use 'text', 'json_object' or "
                                f"'json_schema'", param="response_format")
    if body.structured_outputs is not None:
        options = body.structured_outputs
        for key, value in options.items():
            if key not in _CONSTRAINTS and (key not in _NO_OP_OPTIONS or value not in (None, False, "")):
                raise APIError(400, f"structured_outputs.{key} is not supported; use one of {list(_CONSTRAINTS)}",
                               param=f"structured_outputs.{key}")
        schema = options.get("json")
        if not isinstance(options.get("json_object", False), bool):
            raise APIError(400, "structured_outputs.json_object must be true or false", param="structured_outputs.json_object")
        given.append(StructuredOutputs(json=schema if schema is None or isinstance(schema, str) else json.dumps(schema),
                                       json_object=bool(options.get("json_object")), regex=options.get("regex"),
                                       choice=options.get("choice")))
    if body.guided_json is not None:
        schema = body.guided_json
        given.append(StructuredOutputs(json=schema if isinstance(schema, str) else json.dumps(schema), source="guided_json"))
    if body.guided_regex is not None:
        given.append(StructuredOutputs(regex=body.guided_regex, source="guided_regex"))
    if body.guided_choice is not None:
        given.append(StructuredOutputs(choice=list(body.guided_choice), source="guided_choice"))
    if len(given) > 1:
        names = [g.source or "structured_outputs" for g in given]
        raise APIError(400, f"{names[1]}: give one output constraint, not {' and '.join(names)}", param=names[1])
    return given[0] if given else None
