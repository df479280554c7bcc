"""The OpenAI-compatible HTTP app: its routes, over the engine protocol (AsyncLLM: validate,
generate, abort, health, stats).

A body is shaped into validated engine requests (server/shaping.py) before anything reaches the
engine; the answer is one JSON body or an SSE stream (server/streaming.py) in the shapes of
server/responses.py; every error maps to HTTP in one place (server/errors.py).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from tokenizers import Tokenizer

from ponder import __version__
from server.chat import render_chat
from server.config import ServerConfig
from server.errors import APIError, install_error_handlers
from server.guard import Guard
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.responses import ChatShape, CompletionShape
from server.shaping import RequestShaper
from server.streaming import RequestRun, respond


def build_app(engine, tokenizer: Tokenizer, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="Ponder", version=__version__)
    info = engine.info
    metrics = ServerMetrics(config.model_name, info.max_depth, engine.stats)
    shaper = RequestShaper(engine.validator, tokenizer, config)
    install_error_handlers(app)
    app.add_middleware(Guard, config=config, admission=engine.admission_error)

    def run(seqs, prompts: list[list[int]]) -> RequestRun:
        return RequestRun(engine, metrics, seqs, sum(len(p) for p in prompts), config.request_timeout_s)

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        shaper.check_model(body.model)
        shaper.check_fields(body)
        prompts = shaper.prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it is only meaningful with echo=true", param="max_tokens")
        if body.echo and body.stream:
            raise APIError(400, "echo is supported without stream only", param="echo")
        # echo with max_tokens=0 (how evaluation harnesses score a text): run one step, return only the prompt.
        echo_only = body.echo and body.max_tokens == 0
        max_tokens = 1 if echo_only else shaper.default_max_tokens(prompts, body.max_tokens)
        sampling, compute = shaper.params(body, max_tokens, body.logprobs, body.logprobs if body.echo else None)
        seqs = shaper.sequences(prompts, sampling, compute)
        echoed = None
        if body.echo:
            texts = [body.prompt] if isinstance(body.prompt, str) else [p if isinstance(p, str) else None for p in body.prompt]
            if len(texts) != len(prompts):  # one prompt given as token ids
                texts = [None]
            echoed = [t if t is not None else tokenizer.decode(ids) for t, ids in zip(texts, prompts) for _ in range(body.n)]
        shape = CompletionShape(config.model_name, tokenizer, body.logprobs is not None, compute.include_thoughts,
                                echoed=echoed, echo_only=echo_only)
        return await respond(run(seqs, prompts), shape, body.stream, include_usage(body), info.max_depth)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        shaper.check_model(body.model)
        shaper.check_fields(body)
        prompts = [shaper.chat_prompt(body.messages)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = shaper.default_max_tokens(prompts, body.max_completion_tokens or body.max_tokens)
        sampling, compute = shaper.params(body, max_tokens, logprobs)
        seqs = shaper.sequences(prompts, sampling, compute)
        shape = ChatShape(config.model_name, tokenizer, body.logprobs, compute.include_thoughts)
        return await respond(run(seqs, prompts), shape, body.stream, include_usage(body), info.max_depth)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "ponder", "max_model_len": info.max_model_len,
                                            "max_depth": info.max_depth,
                                            "compute_budgets": {"default": info.default_compute_budget,
                                                                "quality": info.budget_quality,
                                                                "measured_on": info.budget_quality_measured_on}}]}

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
        shaper.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else render_chat(body.messages, config.chat_template)
        ids = shaper.encode(text, "prompt" if body.prompt is not None else "messages")
        return {"tokens": ids, "count": len(ids), "max_model_len": info.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        shaper.check_model(body.model)
        vocab = tokenizer.get_vocab_size()
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app
