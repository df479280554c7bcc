"""End to end: `ponder serve` on the embedded default model, driven by the official OpenAI SDK."""

import json
import signal
import urllib.request

import openai
import pytest


def test_openai_sdk_chat_and_completions_with_compute_params(server):
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    model = client.models.list().data[0].id
    assert model == "austen-small"
    full = client.completions.create(model=model, prompt="Anne Elliot", max_tokens=12, temperature=0,
                                     extra_body={"compute_budget": 1.0})
    half = client.completions.create(model=model, prompt="Anne Elliot", max_tokens=12, temperature=0,
                                     extra_body={"compute_budget": 0.5})
    assert full.usage.compute["mean_depth"] == 6.0 and full.usage.compute["saved_fraction"] == 0.0
    assert half.usage.compute["mean_depth"] < 6.0 and half.usage.compute["saved_fraction"] > 0.2
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who is Mr. Darcy?"}],
                                          max_tokens=10, temperature=0, extra_body={"compute_budget": 0.5})
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 10
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who is Mr. Darcy?"}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"compute_budget": 0.5})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.compute["max_depth"] == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="Anne Elliot", max_tokens=12, temperature=0, stream=True, extra_body={"compute_budget": 0.5}))
    assert text == half.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", extra_body={"compute_budget": 2})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")


def test_openai_sdk_logit_bias_and_refused_fields(server):
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    first = client.completions.create(model="austen-small", prompt="Anne", max_tokens=1, temperature=0)
    request = urllib.request.Request(f"{base}/tokenize", json.dumps({"prompt": first.choices[0].text}).encode(),
                                     {"Content-Type": "application/json"})
    token = json.load(urllib.request.urlopen(request))["tokens"][0]
    banned = client.completions.create(model="austen-small", prompt="Anne", max_tokens=1, temperature=0,
                                       logit_bias={str(token): -100}, logprobs=0)
    assert banned.choices[0].text != first.choices[0].text
    with pytest.raises(openai.BadRequestError, match="tool calling"):
        client.chat.completions.create(model="austen-small", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model="austen-small", prompt="Anne", stream_options={"include_usage": True})


def test_openai_sdk_structured_outputs(server):
    import re

    import jsonschema_rs
    from pydantic import BaseModel, Field

    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Who is Anne Elliot?"}]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(model="austen-small", messages=messages, max_tokens=64, seed=1,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(r.choices[0].message.content))

    class Person(BaseModel):  # the SDK's parse(): a pydantic model as the schema, the reply parsed into it
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=99)

    parsed = client.chat.completions.parse(model="austen-small", messages=messages, max_tokens=64, seed=2,
                                           response_format=Person)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    # Free-form JSON: the Austen model never closes its object within its context, so only its start is checked.
    obj = client.chat.completions.create(model="austen-small", messages=messages, max_tokens=8, seed=3,
                                         response_format={"type": "json_object"})
    free = client.chat.completions.create(model="austen-small", messages=messages, max_tokens=8, seed=3)
    assert obj.choices[0].message.content.startswith('{"') and not free.choices[0].message.content.startswith("{")

    choices = ["Anne", "Emma", "Elizabeth"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        chat = client.chat.completions.create(model="austen-small", messages=messages, max_tokens=8, extra_body=extra)
        assert chat.choices[0].message.content in choices and chat.choices[0].finish_reason == "stop"
        text = client.completions.create(model="austen-small", prompt="Her name was", max_tokens=8, extra_body=extra)
        assert text.choices[0].text in choices
    for extra in ({"guided_regex": "[0-9]{3}-[a-z]{2,4}"}, {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2,4}"}}):
        text = client.completions.create(model="austen-small", prompt="The code is", max_tokens=12, extra_body=extra)
        assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", text.choices[0].text), text.choices[0].text
    stream = client.completions.create(model="austen-small", prompt="The code is", max_tokens=12, stream=True,
                                       extra_body={"guided_regex": "[0-9]{3}-[a-z]{2,4}", "seed": 4})
    assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", "".join(c.choices[0].text for c in stream if c.choices))
    with pytest.raises(openai.BadRequestError, match="guided_regex"):
        client.completions.create(model="austen-small", prompt="x", extra_body={"guided_regex": "[0-9"})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="austen-small", messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nothing"}}})


def test_openai_sdk_reasoning_effort_sets_the_compute_budget(server):
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Who is Mr. Darcy?"}]

    def depth(**kwargs) -> float:
        r = client.chat.completions.create(model="austen-small", messages=messages, max_tokens=12, temperature=0,
                                           **kwargs)
        return r.usage.compute["mean_depth"]

    high, low = depth(reasoning_effort="high"), depth(reasoning_effort="low")
    assert high == 6.0 and low < high  # high: full depth; low: compute_budget 0.5
    assert depth(reasoning_effort="low", extra_body={"compute_budget": 1.0}) == 6.0  # an explicit budget wins
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model="austen-small", messages=messages, reasoning_effort="extreme")


def test_sigterm_shuts_down_gracefully(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn drains, then re-raises the signal it caught, so -SIGTERM is a clean exit too.
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = proc.stdout.read().decode()
    assert "Finished server process" in log and "Traceback" not in log
