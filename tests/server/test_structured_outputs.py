"""Structured outputs through the app on the tiny engine: guided_choice, guided_regex and the other
spellings of a constraint, the errors that name the field, and a finish when the grammar is complete."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from tokenizers import decoders

from tests.server.tiny_app import tiny_app

CHOICES = ["yes", "no", "maybe"]
REGEX = "[a-c]{2,5}x"  # the tiny vocabulary's EOS is the symbol '1', so the patterns avoid it


@pytest.fixture(scope="module")
def client():
    engine, _, app = tiny_app({"max_waiting": 64})
    engine.tokenizer.decoder = decoders.Fuse()  # symbols decode without spaces between them, as in the thought tasks
    with TestClient(app) as c:
        yield c


def completion(client, **body) -> dict:
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 16, "temperature": 1.0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def chat(client, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                                                 "temperature": 1.0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_guided_choice_returns_one_of_the_choices(client):
    seen = set()
    for seed in range(12):
        choice = completion(client, guided_choice=CHOICES, seed=seed)
        assert choice["text"] in CHOICES and choice["finish_reason"] == "stop", choice
        seen.add(choice["text"])
        message = chat(client, guided_choice=CHOICES, seed=seed)
        assert message["message"]["content"] in CHOICES and message["finish_reason"] == "stop"
    assert len(seen) > 1  # sampled among the choices, not forced to one


def test_guided_regex_matches(client):
    for seed in range(12):
        choice = completion(client, guided_regex=REGEX, seed=seed)
        assert re.fullmatch(REGEX, choice["text"]) and choice["finish_reason"] == "stop", choice
        message = chat(client, guided_regex=REGEX, seed=seed)["message"]["content"]
        assert re.fullmatch(REGEX, message), message
    # Unconstrained, the same seeds do not produce such text.
    assert not all(re.fullmatch(REGEX, completion(client, seed=s)["text"]) for s in range(4))


def test_structured_outputs_spelling_and_streaming(client):
    for seed in range(4):
        assert completion(client, structured_outputs={"regex": REGEX}, seed=seed)["text"] == \
            completion(client, guided_regex=REGEX, seed=seed)["text"]
        assert completion(client, structured_outputs={"choice": CHOICES, "disable_fallback": False},
                          seed=seed)["text"] in CHOICES
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "seed": 5, "guided_regex": REGEX,
            "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == chat(client, guided_regex=REGEX, seed=5)["message"]["content"]


def test_greedy_unconstrained_request_is_unchanged_beside_constrained_ones(client):
    alone = completion(client, temperature=0, ignore_eos=True, max_tokens=12)["text"]
    # The in-process engine batches concurrent requests; with a thread pool they share steps.
    with ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(completion, client, guided_regex=REGEX, seed=s) for s in range(5)]
        together = pool.submit(completion, client, temperature=0, ignore_eos=True, max_tokens=12)
        assert together.result()["text"] == alone
        assert all(re.fullmatch(REGEX, f.result()["text"]) for f in constrained)


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "[a-c"}, "guided_regex"),
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "response_format"),
    ({"response_format": {"type": "grammar"}}, "response_format"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens"),
])
def test_a_bad_constraint_is_a_400_naming_its_field(client, extra, param):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert client.get("/health").status_code == 200
