"""The HTTP app on a real engine with the tiny random model, its core in a thread (no process)."""

from runtime.engine.async_llm import AsyncLLM
from runtime.engine.core_client import InprocCoreClient
from server.app import build_app
from server.config import ServerConfig
from tests.runtime.engine.test_engine import make_engine


def tiny_app(engine_kwargs: dict | None = None, **config):
    """(LLMEngine, AsyncLLM, app); the LLMEngine's core is the one the app serves."""
    engine = make_engine(**(engine_kwargs or {}))
    llm = AsyncLLM(InprocCoreClient(engine.core), engine.tokenizer)
    return engine, llm, build_app(llm, engine.tokenizer, ServerConfig(model_name="tiny", **config))
