"""Request body limit (with and without Content-Length) and the per-request timeout."""

import time

import pytest
from fastapi.testclient import TestClient

from tests.server.tiny_app import tiny_app


def serve(**config):
    engine, _, app = tiny_app(**config)
    return engine, TestClient(app)


@pytest.fixture(scope="module")
def client():
    _, c = serve(max_body_bytes=2000)
    with c:
        yield c


def test_body_over_the_limit_is_413_and_the_server_keeps_serving(client):
    big = {"prompt": "a" * 3000, "max_tokens": 1}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must hold while streaming the body in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 100
        yield b'", "max_tokens": 1}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    ok = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_chunked_body_under_the_limit_reaches_the_route(client):
    def chunks():
        yield b'{"prompt": "ab", '
        yield b'"max_tokens": 2, "ignore_eos": true}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_a_request_past_its_timeout_is_408_and_frees_its_kv():
    engine, c = serve(request_timeout_s=0.02)
    with c:
        r = c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 60, "ignore_eos": True})
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
        for _ in range(100):  # the abort reaches the engine loop within a step or two
            if engine.scheduler.kv_usage() == 0 and not engine.has_unfinished():
                break
            time.sleep(0.05)
        assert engine.scheduler.kv_usage() == 0 and not engine.has_unfinished()
        assert c.get("/health").json()["healthy"]
