"""The HTTP API on a real engine with a tiny model (FastAPI TestClient)."""

import json

import pytest
from fastapi.testclient import TestClient

from tests.server.tiny_app import tiny_app


@pytest.fixture(scope="module")
def client():
    _, _, app = tiny_app({"max_waiting": 64})
    with TestClient(app) as c:
        yield c


def sse(response) -> list[dict]:
    lines = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_completion_with_compute_usage_and_logprobs(client):
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                             "logprobs": 2, "compute_budget": 0.5, "some_future_field": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["exit_depths"]) == 5
    assert all(len(t) <= 2 for t in choice["logprobs"]["top_logprobs"])
    compute = body["usage"]["compute"]
    assert compute["max_depth"] == 3 and 0 <= compute["mean_depth"] <= 3
    assert compute["saved_fraction"] == pytest.approx(1 - compute["mean_depth"] / 3)
    assert body["usage"]["completion_tokens"] == 5


def test_n_and_multiple_prompts_and_seed(client):
    r = client.post("/v1/completions", json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 4, "seed": 7,
                                             "temperature": 1.0, "ignore_eos": True})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    again = client.post("/v1/completions", json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 4, "seed": 7,
                                                 "temperature": 1.0, "ignore_eos": True}).json()["choices"]
    assert [c["text"] for c in choices] == [c["text"] for c in again]


def test_chat_streaming_with_usage(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                                  "stream": True, "stream_options": {"include_usage": True},
                                                  "ignore_eos": True, "temperature": 0})
    events = sse(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 6 and "compute" in events[-1]["usage"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    plain = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                                      "ignore_eos": True, "temperature": 0}).json()
    assert plain["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "compute_budget": 0}, "compute_budget"),
    ({"prompt": "x", "compute_budget": 1.5}, "compute_budget"),
    ({"prompt": "x", "max_depth": 9}, "max_depth"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 80}, "prompt"),
    ({"prompt": [1, 2, 999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),  # found by the fuzz run: was an OverflowError (500) in decode
    ({"prompt": [[3, 4], [5, -2]], "echo": True, "max_tokens": 0}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({}, "prompt"),
])
def test_bad_completion_input_is_a_400_naming_the_field(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or "") + err["message"]


def test_other_errors(client):
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    r = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400


def test_models_health_version_tokenize_metrics(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "tiny"
    # What each budget costs, from the checkpoint's calibration.json, before anyone sends it.
    assert model["compute_budgets"] == {"default": 1.0, "measured_on": "test data", "quality": [
        {"budget": 1.0, "ppl": 60.0, "ppl_increase": 0.0}, {"budget": 0.5, "ppl": 66.0, "ppl_increase": 0.1}]}
    assert client.get("/health").json()["healthy"]
    assert client.get("/version").json()["version"]
    ids = client.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"].replace(" ", "") == "abc"
    assert client.post("/detokenize", json={"tokens": [10_000]}).status_code == 400
    client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "ignore_eos": True})
    text = client.get("/metrics").text
    for name in ("ponder:num_requests_running", "ponder:kv_cache_usage_perc", "ponder:prompt_tokens_total",
                 "ponder:generation_tokens_total", "ponder:request_success_total", "ponder:token_exit_depth_bucket",
                 "ponder:core_steps_executed_total", "ponder:core_steps_full_depth_total", "ponder:block_steps_total",
                 "ponder:time_to_first_token_seconds_bucket", "ponder:e2e_request_latency_seconds_bucket",
                 "ponder:request_compute_budget_bucket", "ponder:inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert 'model_name="tiny"' in text
    queued = [line for line in text.splitlines() if line.startswith("ponder:request_queue_time_seconds_count")]
    assert queued and float(queued[0].split()[-1]) >= 1  # every request that ran was queued once


def test_api_key_is_enforced():
    _, _, app = tiny_app(api_key="sekrit")
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_echo_scores_the_prompt_like_vllm(client):
    """echo=true, logprobs=N, max_tokens=0: the prompt back with its token logprobs (lm-eval's scoring call)."""
    r = client.post("/v1/completions", json={"prompt": "abcabc", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice, n = body["choices"][0], len(client.post("/tokenize", json={"prompt": "abcabc"}).json()["tokens"])
    lp = choice["logprobs"]
    assert choice["text"] == "abcabc" and body["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["exit_depths"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:]) and all(len(t) == 1 for t in lp["top_logprobs"][1:])
    # Scoring at a lower budget: the same prompt, a shallower mean depth.
    low = client.post("/v1/completions", json={"prompt": "abcabc", "echo": True, "logprobs": 0, "max_tokens": 0,
                                               "exit_price": 1e3}).json()["choices"][0]["logprobs"]
    assert max(low["exit_depths"][1:]) <= min(lp["exit_depths"][1:])
    # echo with generation: the prompt, then the completion, logprobs for both.
    both = client.post("/v1/completions", json={"prompt": "ab", "echo": True, "logprobs": 0, "max_tokens": 3,
                                                "ignore_eos": True, "temperature": 0}).json()["choices"][0]
    assert both["text"].startswith("ab") and len(both["logprobs"]["tokens"]) == 2 + 3


@pytest.mark.parametrize("body", [
    {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "echo": True, "stream": True},
    {"prompt": "x", "echo": True, "logprobs": 21, "max_tokens": 0},
])
def test_bad_echo_requests_are_400(client, body):
    assert client.post("/v1/completions", json=body).status_code == 400


def test_routing_errors_are_openai_shaped(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["code"] == "405"
