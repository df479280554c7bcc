"""Schemathesis fuzzing of every endpoint in the app's OpenAPI schema, in-process on a real tiny engine:
no input a client can send gets a 5xx.

The default run is bounded (FUZZ_EXAMPLES per endpoint); a longer one:
    PONDER_FUZZ_EXAMPLES=1000 python -m pytest tests/server/test_fuzz.py -q
"""

import os

import schemathesis
from hypothesis import HealthCheck, settings

from tests.server.tiny_app import tiny_app

FUZZ_EXAMPLES = int(os.environ.get("PONDER_FUZZ_EXAMPLES", "40"))

_engine, _async_engine, app = tiny_app({"max_waiting": 64})
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code}: " \
                                       f"{response.text[:500]}"
    assert _async_engine.health()["error"] is None, f"{case.body!r} broke the engine: {_async_engine.health()}"
    if response.status_code >= 400:  # every error is OpenAI-shaped
        assert "error" in response.json(), response.text[:500]


def test_the_schema_covers_every_endpoint():
    paths = {op.ok().path for op in schema.get_all_operations()}
    assert paths >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models", "/health",
                     "/version", "/metrics"}
