"""Every field of OpenAI's completions and chat schemas (and vLLM's extras that Ponder declares) is
implemented or refused with a 400 naming it; none is silently ignored. And logit_bias, applied in
the batched sampler."""

import pytest
from fastapi.testclient import TestClient

from server.protocol import NOT_IMPLEMENTED, ChatCompletionRequest, CompletionRequest
from tests.server.tiny_app import tiny_app

# (field, a value that asks for something): "ok" when implemented, "refused" when not.
COMPLETIONS = {
    "model": ("tiny", "ok"), "prompt": ("abc", "ok"), "best_of": (3, "refused"), "echo": (True, "ok"),
    "frequency_penalty": (0.5, "ok"), "logit_bias": ({"5": 3.0}, "ok"), "logprobs": (2, "ok"),
    "max_tokens": (3, "ok"), "n": (2, "ok"), "presence_penalty": (0.5, "ok"), "seed": (7, "ok"),
    "stop": (["x"], "ok"), "stream": (True, "ok"), "stream_options": ({"include_usage": True}, "ok"),
    "suffix": ("the end", "refused"), "temperature": (0.5, "ok"), "top_p": (0.9, "ok"), "user": ("u1", "ok"),
}
CHAT = {
    "messages": ([{"role": "user", "content": "hi"}], "ok"), "model": ("tiny", "ok"),
    "audio": ({"voice": "alloy", "format": "wav"}, "refused"), "frequency_penalty": (0.5, "ok"),
    "function_call": ("auto", "refused"), "functions": ([{"name": "f"}], "refused"),
    "logit_bias": ({"5": -3.0}, "ok"), "logprobs": (True, "ok"), "max_completion_tokens": (3, "ok"),
    "max_tokens": (3, "ok"), "metadata": ({"k": "v"}, "ok"), "modalities": (["text", "audio"], "refused"),
    "n": (2, "ok"), "parallel_tool_calls": (True, "refused"), "prediction": ({"type": "content", "content": "x"}, "refused"),
    "presence_penalty": (0.5, "ok"), "prompt_cache_key": ("k", "ok"), "reasoning_effort": ("low", "ok"),
    "response_format": ({"type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": ["abc", "cab"]}}}, "ok"), "safety_identifier": ("s", "ok"), "seed": (7, "ok"),
    "service_tier": ("auto", "ok"), "stop": (["x"], "ok"), "store": (True, "refused"), "stream": (True, "ok"),
    "stream_options": ({"include_usage": True}, "ok"), "temperature": (0.5, "ok"),
    "tool_choice": ("auto", "refused"), "tools": ([{"type": "function", "function": {"name": "f"}}], "refused"),
    "top_logprobs": (2, "ok"), "top_p": (0.9, "ok"), "user": ("u1", "ok"), "verbosity": ("low", "refused"),
    "web_search_options": ({}, "refused"),
}

# vLLM's extras, on both endpoints.
VLLM_EXTRAS = {
    "guided_json": ({"enum": ["abc", "cab"]}, "ok"), "guided_regex": ("[a-c]{1,4}", "ok"),
    "guided_choice": (["yes", "no"], "ok"), "structured_outputs": ({"choice": ["yes", "no"]}, "ok"),
    "guided_grammar": ('root ::= "a"', "refused"), "thinking_token_budget": (2, "ok"), "include_reasoning": (True, "ok"),
    "reasoning_effort": ("high", "ok"),
}


@pytest.fixture(scope="module")
def client():
    _, _, app = tiny_app({"max_waiting": 64})
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("schema, fields", [(CompletionRequest, COMPLETIONS), (ChatCompletionRequest, CHAT),
                                            (CompletionRequest, VLLM_EXTRAS), (ChatCompletionRequest, VLLM_EXTRAS)])
def test_every_openai_field_is_declared(schema, fields):
    assert set(fields) <= set(schema.model_fields), "an OpenAI field would fall into model_extra: only logged"
    refused = {f for f, (_, outcome) in fields.items() if outcome == "refused"}
    assert refused <= set(NOT_IMPLEMENTED)


@pytest.mark.parametrize("path, fields, base", [
    ("/v1/completions", COMPLETIONS, {"prompt": "abc", "max_tokens": 2}),
    ("/v1/chat/completions", CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/completions", VLLM_EXTRAS, {"prompt": "abc", "max_tokens": 2}),
    ("/v1/chat/completions", VLLM_EXTRAS, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
])
def test_schema_walk(client, path, fields, base):
    for name, (value, outcome) in fields.items():
        body = {**base, name: value}
        if name == "stream_options":
            body["stream"] = True
        if name == "echo":
            body["stream"] = False
        r = client.post(path, json=body)
        if outcome == "ok":
            assert r.status_code == 200, (name, r.text)
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)


def test_no_op_values_of_refused_fields_are_accepted(client):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra in ({"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}}, {"store": False},
                  {"modalities": ["text"]}):
        assert client.post("/v1/chat/completions", json={**chat, **extra}).status_code == 200, extra
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 2, "best_of": 2}).status_code == 200


def test_stream_options_without_stream_is_400(client):
    r = client.post("/v1/completions", json={"prompt": "a", "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("bias, param", [({"64": 1.0}, "logit_bias"), ({"5": 101}, "logit_bias"),
                                         ({"x": 1.0}, "logit_bias.x"), ({"-1": 1.0}, "logit_bias")])
def test_bad_logit_bias_is_400(client, bias, param):
    r = client.post("/v1/completions", json={"prompt": "a", "logit_bias": bias})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text


def test_logit_bias_plus_100_always_picks_the_token_and_minus_100_never_does(client):
    body = {"prompt": "abc", "max_tokens": 24, "temperature": 1.0, "ignore_eos": True, "seed": 3, "logprobs": 0}

    def tokens(**extra) -> list[str]:
        return client.post("/v1/completions", json={**body, **extra}).json()["choices"][0]["logprobs"]["tokens"]

    first = tokens()[0]
    token = client.post("/tokenize", json={"prompt": first}).json()["tokens"][0]
    assert tokens(logit_bias={str(token): 100}) == [first] * 24
    banned = tokens(logit_bias={str(token): -100})
    assert first not in banned and len(banned) == 24
