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


def test_sigterm_shuts_down_gracefully(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn drains, then re-raises the signal it caught, so -SIGTERM is a clean exit too.
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = proc.stdout.read().decode()
    assert "Finished server process" in log and "Traceback" not in log
