"""`ponder serve`: the OpenAI-compatible server, with vLLM-style flags."""

from __future__ import annotations

import argparse
import logging
import os

from runtime.checkpoint import DEFAULT_MODEL


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    s.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the embedded model)")
    s.add_argument("--served-model-name", help="model name clients use (default: the directory name)")
    s.add_argument("--host", default=os.environ.get("PONDER_HOST", "127.0.0.1"),
                   help="address to bind (default: $PONDER_HOST, else 127.0.0.1; the image sets 0.0.0.0)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    s.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 where this CPU or GPU runs it natively, else float32) | float32 | bfloat16 | float16")
    s.add_argument("--default-compute-budget", type=float, default=1.0, help="budget when a request sets none")
    s.add_argument("--max-num-seqs", type=int, default=32)
    s.add_argument("--max-num-batched-tokens", type=int, default=1024)
    s.add_argument("--max-model-len", type=int, help="default: the model's max_seq_len")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--kv-cache-gib", type=float, default=4.0, help="KV cache memory cap (GiB) when sizing by default")
    s.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (overrides --kv-cache-gib)")
    s.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may still run before they are aborted")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive (408)")
    s.add_argument("--max-stream-buffer", type=int, default=256,
                   help="outputs a stream may hold unread before its request is aborted (a stuck client)")
    s.add_argument("--chat-template", help="a Jinja chat template (or a file holding one) over `messages`, "
                                          "for checkpoints whose tokenizer has none")
    s.add_argument("--threads", type=int, help="torch threads of the engine core (default: torch's choice)")
    s.add_argument("--no-warm-up", action="store_true",
                   help="skip building every kernel shape at start-up (faster start; memory then grows with traffic)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=run_serve)


def build_server(args: argparse.Namespace):
    """The app and its engine: the engine core starts in its own process and loads the model; this
    process keeps only the tokenizer (HTTP, tokenizing, detokenizing, output processing)."""
    from pathlib import Path

    from runtime.checkpoint import load_config, load_tokenizer
    from runtime.engine.async_llm import AsyncLLM
    from runtime.engine.core import EngineConfig
    from runtime.engine.core_client import MPCoreClient
    from server.app import build_app
    from server.config import ServerConfig

    engine_config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        max_model_len=args.max_model_len, max_waiting=args.max_waiting, default_compute_budget=args.default_compute_budget,
        kv_cache_gib=args.kv_cache_gib, num_kv_blocks=args.num_kv_blocks, warm_up=not args.no_warm_up,
    )
    load_config(args.model)  # a missing or broken checkpoint fails here, before a process starts
    client = MPCoreClient(args.model, args.device, args.dtype, engine_config, num_threads=args.threads)
    tokenizer, chat_template = load_tokenizer(args.model)
    engine = AsyncLLM(client, tokenizer, max_buffered_outputs=args.max_stream_buffer)
    config = ServerConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name, api_key=args.api_key,
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout,
        chat_template=_read_template(args.chat_template) or chat_template,
    )
    return build_app(engine, tokenizer, config), engine


def _read_template(value: str | None) -> str | None:
    from pathlib import Path

    if value and len(value) < 4096 and Path(value).is_file():
        return Path(value).read_text()
    return value


def run_serve(args: argparse.Namespace) -> None:
    import asyncio

    import uvicorn

    from server.lifecycle import DrainingServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, engine = build_server(args)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5), engine, args.shutdown_timeout)

    @app.on_event("startup")
    async def _supervise() -> None:
        app.state.supervisor = asyncio.get_running_loop().create_task(server.supervise())

    @app.on_event("shutdown")
    async def _close() -> None:
        await server.close_engine()

    server.run()
    if engine.dead is not None:
        logging.getLogger("ponder.server").error("exiting: the engine core died (%s)", engine.dead)
        raise SystemExit(1)
