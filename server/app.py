"""The OpenAI-compatible HTTP app, built from the engine protocol (generate / abort / health / stats).

All validation happens before a request reaches the engine; every error a client can cause
maps to an OpenAI-shaped 4xx in one place (`_error_response`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from ponder import __version__
from runtime.engine.params import ComputeParams, ParamError, SamplingParams
from runtime.engine.scheduler import OverloadedError, RequestTooLongError
from server.chat import render_chat
from server.metrics import ServerMetrics
from server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
)

log = logging.getLogger("ponder.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code or str(e.status)}}
    return JSONResponse(body, status_code=e.status)


@dataclass
class ServerConfig:
    model_name: str
    max_depth: int
    max_model_len: int
    default_compute_budget: float = 1.0
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 600.0
    chat_template: str | None = None
    thought_kv_modes: list[str] = field(default_factory=lambda: ["keep"])  # what the checkpoint was trained for


@dataclass
class _Seq:
    """One generated sequence (a choice) of a request."""

    index: int
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    hidden: list[bool] = field(default_factory=list)  # per token: a thought or thought marker
    reasoning: str = ""
    thought_tokens: int = 0
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # with echo and logprobs
    prompt_depths: list[int] | None = None


def build_app(engine, tokenizer: Tokenizer, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="Ponder", version=__version__)
    metrics = ServerMetrics(config.model_name, config.max_depth, engine.stats)
    counter = itertools.count()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(HTTPException)  # routing errors (unknown path, wrong method), OpenAI-shaped too
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        response = _error_response(APIError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404
                                            else "invalid_request_error"))
        response.headers.update(e.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param))

    app.add_middleware(_Guard, config=config)

    # ----- helpers -----

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def log_unknown(body) -> None:
        if body.model_extra:
            log.warning("ignoring unknown request fields: %s", sorted(body.model_extra))

    def params(body, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> tuple[SamplingParams, ComputeParams]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            sampling = SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                min_p=body.min_p, seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, max_tokens),
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            )
            compute = ComputeParams(compute_budget=body.compute_budget, min_depth=body.min_depth,
                                    max_depth=body.max_depth, exit_price=body.exit_price,
                                    max_thought_tokens=body.max_thought_tokens, include_thoughts=body.include_thoughts,
                                    thought_kv=body.thought_kv)
            compute.validate(config.max_depth, config.thought_kv_modes)
        except ParamError as e:
            raise APIError(400, str(e), param=e.param) from e
        return sampling, compute

    async def run(prompts: list[list[int]], n: int, sampling: SamplingParams, compute: ComputeParams,
                  started: float) -> AsyncIterator[tuple[_Seq, object]]:
        """Start every (prompt, sample) sequence, then yield (seq, RequestOutput) as outputs arrive."""
        queue: asyncio.Queue = asyncio.Queue()
        seqs, tasks = [], []
        base = f"req-{next(counter)}-{uuid.uuid4().hex[:8]}"

        async def pump(seq: _Seq, stream: AsyncIterator) -> None:
            try:
                async for out in stream:
                    await queue.put((seq, out))
            except Exception as e:  # delivered to the consumer below
                await queue.put((seq, e))
            await queue.put((seq, None))

        try:
            for i, ids in enumerate(prompts):
                for j in range(n):
                    seq = _Seq(index=i * n + j, prompt_ids=ids)
                    seed = None if sampling.seed is None else sampling.seed + j
                    # Raises validation and overload errors at once, before anything is sent.
                    stream = engine.generate(f"{base}-{seq.index}", ids, replace(sampling, seed=seed), compute)
                    seqs.append(seq)
                    tasks.append(asyncio.create_task(pump(seq, stream)))
        except (ParamError, RequestTooLongError) as e:
            _cancel(tasks)
            raise APIError(400, str(e), param=getattr(e, "param", "prompt")) from e
        except OverloadedError as e:
            _cancel(tasks)
            raise APIError(429, f"server overloaded: {e or 'too many waiting requests'}; retry later",
                           "overloaded_error", code="429") from e
        remaining = len(seqs)
        try:
            while remaining:
                left = config.request_timeout_s - (time.monotonic() - started)
                if left <= 0:  # outputs may keep arriving; the deadline holds all the same
                    raise asyncio.TimeoutError
                seq, item = await asyncio.wait_for(queue.get(), timeout=left)
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                yield seq, item
        except asyncio.TimeoutError:
            raise APIError(408, f"request timed out after {config.request_timeout_s}s", "timeout_error") from None
        finally:
            _cancel(tasks)

    def record(seq: _Seq, out, started: float, last: dict) -> None:
        now = time.monotonic()
        if out.new_token_ids:
            if seq.index not in last:
                metrics.ttft.labels(config.model_name).observe(now - started)
            else:
                metrics.itl.labels(config.model_name).observe(now - last[seq.index])
            last[seq.index] = now
        if out.prompt_logprobs is not None:
            seq.prompt_logprobs, seq.prompt_depths = out.prompt_logprobs, out.prompt_depths
        if out.queue_time is not None:
            metrics.queue_time.labels(config.model_name).observe(out.queue_time)
        seq.text += out.new_text
        seq.token_ids += out.new_token_ids
        seq.depths += out.exit_depths
        seq.logprobs += out.logprobs
        seq.hidden += out.hidden or [False] * len(out.new_token_ids)
        seq.reasoning += out.new_reasoning_text
        seq.thought_tokens = out.num_thought_tokens
        if out.num_new_thought_tokens:
            metrics.thought_tokens.labels(config.model_name).inc(out.num_new_thought_tokens)
        for d in out.exit_depths:
            metrics.exit_depth.labels(config.model_name).observe(d)
        if out.finished:
            seq.finish_reason = {"abort": "abort", "error": "error"}.get(out.finish_reason, out.finish_reason)
            metrics.success.labels(config.model_name, out.finish_reason or "unknown").inc()
            metrics.generation_tokens.labels(config.model_name).inc(len(seq.token_ids))

    def usage(seqs: list[_Seq], prompt_tokens: int) -> dict:
        depths = [d for s in seqs for d in s.depths]
        mean = sum(depths) / len(depths) if depths else 0.0
        completion = sum(len(s.token_ids) for s in seqs)
        thoughts = sum(s.thought_tokens for s in seqs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
                "completion_tokens_details": {"reasoning_tokens": thoughts},
                "compute": {"mean_depth": mean, "max_depth": config.max_depth,
                            "saved_fraction": 1.0 - mean / config.max_depth if depths and config.max_depth else 0.0,
                            "thought_tokens": thoughts}}

    def finish_request(body, started: float, prompt_tokens: int) -> None:
        metrics.e2e.labels(config.model_name).observe(time.monotonic() - started)
        metrics.prompt_tokens.labels(config.model_name).inc(prompt_tokens)
        metrics.budget.labels(config.model_name).observe(body.compute_budget or config.default_compute_budget)

    def encode(text: str, param: str) -> list[int]:
        try:
            return tokenizer.encode(text).ids
        except Exception as e:  # a closed-vocabulary tokenizer (no unknown token) cannot encode the text
            raise APIError(400, f"{param}: this model's tokenizer cannot encode the text ({e})", param=param) from e

    def encode_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        out = [encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompts]
        vocab = tokenizer.get_vocab_size()
        for ids in out:
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt")
            if not all(0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt has token ids outside the vocabulary [0, {vocab})", param="prompt")
            if len(ids) >= config.max_model_len:
                raise APIError(400, f"prompt has {len(ids)} tokens; this model's context is {config.max_model_len}",
                               param="prompt")
        return out

    def max_new(prompts: list[list[int]], asked: int | None) -> int:
        room = config.max_model_len - max(len(p) for p in prompts)
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens={asked} plus the prompt exceeds the context of {config.max_model_len} "
                                f"tokens; ask for at most {room}", param="max_tokens")
        return asked if asked is not None else room

    async def respond(body, prompts, sampling, compute, started, shape) -> Response:
        prompt_tokens = sum(len(p) for p in prompts)
        if not body.stream:
            seqs: dict[int, _Seq] = {}
            last: dict[int, float] = {}
            async for seq, out in run(prompts, body.n, sampling, compute, started):
                seqs[seq.index] = seq
                record(seq, out, started, last)
            ordered = [seqs[i] for i in sorted(seqs)]
            if getattr(shape, "echo_only", False):
                for seq in ordered:  # the one token run to get there is not part of the answer
                    seq.text, seq.token_ids, seq.depths, seq.logprobs, seq.hidden = "", [], [], [], []
                    seq.finish_reason = "length"
            finish_request(body, started, prompt_tokens)
            return JSONResponse(shape.full(ordered, usage(ordered, prompt_tokens)))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = run(prompts, body.n, sampling, compute, started)
        first = await anext(stream, None)  # errors surface as HTTP errors, before the 200 is sent

        async def events() -> AsyncIterator[str]:
            seqs: dict[int, _Seq] = {}
            last: dict[int, float] = {}
            try:
                item = first
                while item is not None:
                    seq, out = item
                    seqs[seq.index] = seq
                    record(seq, out, started, last)
                    if out.new_text or out.finished or out.new_token_ids:
                        yield f"data: {json.dumps(shape.chunk(seq, out))}\n\n"
                    item = await anext(stream, None)
                finish_request(body, started, prompt_tokens)
                if include_usage:
                    yield f"data: {json.dumps(shape.usage_chunk(usage(list(seqs.values()), prompt_tokens)))}\n\n"
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': str(e.status)}})}\n\n"
            finally:
                await stream.aclose()  # a client that went away aborts its sequences and frees their KV

        return StreamingResponse(events(), media_type="text/event-stream")

    # ----- endpoints -----

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        started = time.monotonic()
        check_model(body.model)
        log_unknown(body)
        prompts = encode_prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it is only meaningful with echo=true", param="max_tokens")
        if body.echo and body.stream:
            raise APIError(400, "echo is supported without stream only", param="echo")
        # echo with max_tokens=0 (how evaluation harnesses score a text): run one step, return only the prompt.
        echo_only = body.echo and body.max_tokens == 0
        max_tokens = 1 if echo_only else max_new(prompts, body.max_tokens)
        sampling, compute = params(body, max_tokens, body.logprobs, body.logprobs if body.echo else None)
        texts = [body.prompt] if isinstance(body.prompt, str) else [p if isinstance(p, str) else None for p in body.prompt]
        if len(texts) != len(prompts):  # one prompt given as token ids
            texts = [None]
        echoed = [t if t is not None else tokenizer.decode(ids) for t, ids in zip(texts, prompts)] if body.echo else []
        shape = _CompletionShape(config.model_name, tokenizer, body.logprobs is not None, body.include_thoughts,
                                 echoed=[e for e in echoed for _ in range(body.n)] if body.echo else None,
                                 echo_only=echo_only)
        return await respond(body, prompts, sampling, compute, started, shape)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        started = time.monotonic()
        check_model(body.model)
        log_unknown(body)
        prompts = [encode(render_chat(body.messages, config.chat_template), "messages")]
        encode_prompts(prompts)
        asked = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling, compute = params(body, max_new(prompts, asked), logprobs)
        return await respond(body, prompts, sampling, compute, started,
                             _ChatShape(config.model_name, tokenizer, body.logprobs, body.include_thoughts))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "ponder", "max_model_len": config.max_model_len,
                                            "max_depth": config.max_depth}]}

    @app.get("/health")
    async def health() -> Response:
        state = engine.health()
        return JSONResponse(state, status_code=200 if state["healthy"] else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else render_chat(body.messages, config.chat_template)
        ids = encode(text, "prompt" if body.prompt is not None else "messages")
        return {"tokens": ids, "count": len(ids), "max_model_len": config.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        vocab = tokenizer.get_vocab_size()
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app


class _Guard:
    """API key and body size limits, as plain ASGI middleware: unlike @app.middleware("http"), it adds
    no task or stream hop to each chunk of a streamed response."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config, headers = self.config, dict(scope["headers"])
        if config.api_key and scope["path"].startswith("/v1"):
            if headers.get(b"authorization") != f"Bearer {config.api_key}".encode():
                return await _error_response(APIError(401, "invalid or missing API key", "authentication_error"))(
                    scope, receive, send)
        size = headers.get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > config.max_body_bytes:
            return await _error_response(APIError(413, f"request body of {size} bytes exceeds {config.max_body_bytes}"))(
                scope, receive, send)
        if b"content-length" in headers or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, received = [], 0  # chunked: count while reading, then hand the body on
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            received += len(message.get("body", b""))
            if received > config.max_body_bytes:
                return await _error_response(APIError(413, f"request body exceeds {config.max_body_bytes} bytes"))(
                    scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def _cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()


def _shown(include_thoughts: bool, hidden: list[bool], *columns: list) -> list[list]:
    """Drop the entries of thought tokens from per-token columns unless thoughts were asked for."""
    if include_thoughts:
        return list(columns)
    keep = [i for i, h in enumerate(hidden) if not h]
    return [[c[i] for i in keep] for c in columns]


def _logprobs_block(seq_logprobs, token_ids: list[int], depths: list[int], tokenizer: Tokenizer) -> dict:
    return {
        "tokens": [tokenizer.decode([t]) for t in token_ids],
        "token_logprobs": [lp.logprob for lp in seq_logprobs],
        "top_logprobs": [{tokenizer.decode([i]): v for i, v in lp.top_logprobs} for lp in seq_logprobs],
        "exit_depths": depths,
    }


def _offsets(tokens: list[str], start: int) -> list[int]:
    """Character offset of each token in the choice text (OpenAI's logprobs.text_offset)."""
    out, at = [], start
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


@dataclass
class _CompletionShape:
    model: str
    tokenizer: Tokenizer
    logprobs: bool  # the request asked for logprobs (each token's exit depth comes with them)
    include_thoughts: bool = False  # reasoning_content, and logprobs of thought tokens
    echoed: list[str] | None = None  # with echo: the prompt text of each choice, prepended to it
    echo_only: bool = False  # echo with max_tokens=0
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _choice(self, seq: _Seq, text: str, reasoning: str, token_ids, depths, logprobs, hidden, finish) -> dict:
        choice = {"index": seq.index, "text": text, "finish_reason": finish, "logprobs": None}
        if self.include_thoughts:
            choice["reasoning_content"] = reasoning
        if self.logprobs:
            token_ids, depths, logprobs = _shown(self.include_thoughts, hidden, token_ids, depths, logprobs)
            choice["logprobs"] = _logprobs_block(logprobs, token_ids, depths, self.tokenizer)
        if self.echoed is not None:
            choice["text"] = self.echoed[seq.index] + text
            if self.logprobs:
                prompt = _logprobs_block(seq.prompt_logprobs or [], seq.prompt_ids[1:], seq.prompt_depths or [], self.tokenizer)
                first = self.tokenizer.decode(seq.prompt_ids[:1])
                choice["logprobs"] = {key: ([first] if key == "tokens" else [None]) + prompt[key] + choice["logprobs"][key]
                                      for key in prompt}
        return choice

    def full(self, seqs: list[_Seq], usage: dict) -> dict:
        choices = [self._choice(s, s.text, s.reasoning, s.token_ids, s.depths, s.logprobs, s.hidden, s.finish_reason)
                   for s in seqs]
        for seq, choice in zip(seqs, choices):
            if choice["logprobs"]:  # offsets count from the start of the prompt, as OpenAI's do
                start = 0 if self.echoed is not None else len(self.tokenizer.decode(seq.prompt_ids))
                choice["logprobs"]["text_offset"] = _offsets(choice["logprobs"]["tokens"], start)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, seq: _Seq, out) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [self._choice(seq, out.new_text, out.new_reasoning_text, out.new_token_ids, out.exit_depths,
                                         out.logprobs, out.hidden or [False] * len(out.new_token_ids),
                                         out.finish_reason if out.finished else None)]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}


@dataclass
class _ChatShape(_CompletionShape):
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")

    def _logprobs(self, logprobs, token_ids, depths, hidden) -> dict | None:
        if not self.logprobs:
            return None
        token_ids, depths, logprobs = _shown(self.include_thoughts, hidden, token_ids, depths, logprobs)
        return {"content": [
            {"token": self.tokenizer.decode([t]), "logprob": lp.logprob, "exit_depth": d,
             "top_logprobs": [{"token": self.tokenizer.decode([i]), "logprob": v} for i, v in lp.top_logprobs]}
            for t, lp, d in zip(token_ids, logprobs, depths)]}

    def full(self, seqs: list[_Seq], usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": s.index, "message": self._message(s),
                             "logprobs": self._logprobs(s.logprobs, s.token_ids, s.depths, s.hidden),
                             "finish_reason": s.finish_reason} for s in seqs],
                "usage": usage}

    def _message(self, seq: _Seq) -> dict:
        message = {"role": "assistant", "content": seq.text}
        if self.include_thoughts:
            message["reasoning_content"] = seq.reasoning
        return message

    def chunk(self, seq: _Seq, out) -> dict:
        delta = {"content": out.new_text}
        if self.include_thoughts and out.new_reasoning_text:
            delta["reasoning_content"] = out.new_reasoning_text
        if len(seq.token_ids) == len(out.new_token_ids):
            delta["role"] = "assistant"
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": seq.index, "delta": delta,
                             "logprobs": self._logprobs(out.logprobs, out.new_token_ids, out.exit_depths,
                                                        out.hidden or [False] * len(out.new_token_ids)),
                             "finish_reason": out.finish_reason if out.finished else None}]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

