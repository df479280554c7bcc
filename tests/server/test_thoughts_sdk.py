"""End to end: `ponder serve` on the shipped addition-with-thoughts checkpoint, driven by the official
OpenAI SDK. The thoughts come back as reasoning_content, apart from the content, streaming or not."""

import sys
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.live_server import free_port, start_server

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "addition-think"
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
QUESTION = "543210+987654="  # 12345 + 456789, digits least significant first
ANSWER = "0469134"


@pytest.fixture(scope="module")
def base():
    port = free_port()
    url, proc = start_server([sys.executable, "-m", "ponder.cli", "serve", "--model", str(CHECKPOINT), "--port", str(port),
                              "--device", "cpu", "--dtype", "float32", "--chat-template", TEMPLATE,
                              "--block-size", "4"], port)
    yield url
    proc.kill()


def thought_total(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ponder:thought_tokens_total"))


@pytest.mark.parametrize("thought_kv", ["keep", "discard"])
def test_chat_returns_reasoning_content_apart_from_content(base, thought_kv):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    counted = thought_total(base)
    r = client.chat.completions.create(model="addition-think", messages=messages, temperature=0, max_tokens=16,
                                       extra_body={"include_thoughts": True, "thought_kv": thought_kv})
    msg = r.choices[0].message
    if thought_kv == "keep":  # this 2-layer checkpoint answers well only with its thoughts kept (see the report)
        assert msg.content == ANSWER and msg.reasoning_content == "edb964"  # 5+9, 4+8+1, 3+7+1 carry (e, d, b); 9, 6, 4
    assert len(msg.content) == len(ANSWER) and msg.content.isdigit()
    assert len(msg.reasoning_content) == 6 and msg.reasoning_content.isalnum()
    assert r.usage.compute["thought_tokens"] == 6 == r.usage.completion_tokens_details.reasoning_tokens
    assert r.usage.completion_tokens == 1 + 6 + 1 + len(ANSWER) + 1  # <think>, thoughts, </think>, answer, <eos>
    assert thought_total(base) == counted + 6

    stream = client.chat.completions.create(model="addition-think", messages=messages, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"include_thoughts": True, "thought_kv": thought_kv})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == msg.reasoning_content
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert chunks[-1].usage.compute["thought_tokens"] == 6

    hidden = client.chat.completions.create(model="addition-think", messages=messages, temperature=0, max_tokens=16,
                                            extra_body={"thought_kv": thought_kv})
    assert hidden.choices[0].message.content == msg.content
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None


def test_thought_budget_and_bad_thought_params(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    direct = client.chat.completions.create(model="addition-think", messages=messages, temperature=0, max_tokens=16,
                                            extra_body={"include_thoughts": True, "max_thought_tokens": 0})
    assert direct.choices[0].message.reasoning_content == "" and direct.usage.compute["thought_tokens"] == 0
    half = client.chat.completions.create(model="addition-think", messages=messages, temperature=0, max_tokens=16,
                                          extra_body={"compute_budget": 0.5})  # default cap: round(0.5 * 6) = 3
    assert half.usage.compute["thought_tokens"] == 3
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="addition-think", messages=messages, extra_body={"thought_kv": "forget"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="addition-think", messages=messages, extra_body={"max_thought_tokens": -1})
    with pytest.raises(openai.BadRequestError):  # the tokenizer has digits only
        client.chat.completions.create(model="addition-think", messages=[{"role": "user", "content": "hello"}])


def test_reasoning_knobs_as_2026_clients_send_them(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]

    def ask(**kwargs):
        return client.chat.completions.create(model="addition-think", messages=messages, temperature=0, max_tokens=16,
                                              **kwargs)

    # include_reasoning=true returns the thoughts in `reasoning` (vLLM's field) and `reasoning_content`.
    r = ask(extra_body={"include_reasoning": True})
    assert r.choices[0].message.reasoning == r.choices[0].message.reasoning_content == "edb964"
    assert r.choices[0].message.content == ANSWER
    stream = ask(stream=True, extra_body={"include_reasoning": True})
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "edb964"
    text = client.completions.create(model="addition-think", prompt=QUESTION, temperature=0, max_tokens=16,
                                     extra_body={"include_reasoning": True})
    assert text.choices[0].reasoning == "edb964" and text.choices[0].text == ANSWER

    # thinking_token_budget is max_thought_tokens.
    assert ask(extra_body={"thinking_token_budget": 2}).usage.compute["thought_tokens"] == 2
    with pytest.raises(openai.BadRequestError, match="thinking_token_budget"):
        ask(extra_body={"thinking_token_budget": 2, "max_thought_tokens": 3})

    # reasoning_effort: the thought cap is a multiple of the trained length (6 here); explicit values win.
    thoughts = {effort: ask(reasoning_effort=effort).usage.compute["thought_tokens"]
                for effort in ("none", "minimal", "low", "medium", "high", "xhigh")}
    assert thoughts == {"none": 0, "minimal": 2, "low": 3, "medium": 6, "high": 6, "xhigh": 6}  # round(0.25 * 6) = 2
    assert ask(reasoning_effort="none", extra_body={"max_thought_tokens": 4}).usage.compute["thought_tokens"] == 4
    assert ask(reasoning_effort="high").choices[0].message.content == ANSWER  # it stops thinking by itself at 6
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        ask(reasoning_effort="maximal")
