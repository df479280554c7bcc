"""Structured outputs in the engine core: constrained and free rows in one batch, preemption by
recompute, thoughts outside the grammar, matchers dropped when their request finishes."""

import re

import pytest
import torch
from tokenizers import decoders

from runtime.engine.params import ComputeParams, ParamError, SamplingParams, StructuredOutputs
from runtime.engine.sampler import apply_bitmask
from tests.runtime.engine import test_thoughts
from tests.runtime.engine.test_engine import drain, make_engine

REGEX = "[a-c]{2,5}x"


def constrained(seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=1.0, seed=seed, structured_outputs=StructuredOutputs(regex=REGEX),
                          **kwargs)


def fused(engine):
    engine.tokenizer.decoder = decoders.Fuse()
    return engine


def test_free_rows_are_untouched_and_pay_nothing_beside_constrained_ones():
    free = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = fused(make_engine())
    engine.add_request("free", [1, 2, 3], free)
    alone = drain(engine)["free"]
    assert engine.executor.structured.num_mask_steps == 0  # no constrained row: no mask was built
    engine.add_request("free", [1, 2, 3], free)
    for i in range(6):
        engine.add_request(f"c{i}", [4, 5, i], constrained(i))
    together = drain(engine)
    assert together["free"]["tokens"] == alone["tokens"] and together["free"]["depths"] == alone["depths"]
    for i in range(6):
        assert re.fullmatch(REGEX, together[f"c{i}"]["text"]) and together[f"c{i}"]["finish"] == "stop"
    structured = engine.executor.structured
    assert structured.num_mask_steps > 0 and structured.num_masked_rows <= 6 * structured.num_mask_steps


def test_constrained_requests_survive_preemption_by_recompute():
    requests = {f"c{i}": ([4, 5, 6, i, 7, 8], constrained(i, ignore_eos=True)) for i in range(8)}
    roomy = fused(make_engine())
    for rid, (prompt, sampling) in requests.items():
        roomy.add_request(rid, prompt, sampling)
    expected = drain(roomy)
    tight = fused(make_engine(num_kv_blocks=10))
    live = {}
    for rid, (prompt, sampling) in requests.items():
        tight.add_request(rid, prompt, sampling)
        live[rid] = tight.scheduler.get_request(rid)
    got = drain(tight)
    assert any(r.num_preemptions for r in live.values())
    for rid in requests:
        assert got[rid]["tokens"] == expected[rid]["tokens"] and re.fullmatch(REGEX, got[rid]["text"])
    # Finished requests' matchers go at the next step; none is left once another request has run.
    tight.add_request("next", [1], SamplingParams(max_tokens=2))
    drain(tight)
    assert set(tight.executor.structured._entries) <= {"next"} and tight.scheduler.allocator.num_used == 0


def test_thoughts_are_outside_the_grammar():
    engine = fused(test_thoughts.make_engine(default_thought_tokens=6))  # trained to think: may open a thought
    think = test_thoughts.THINK
    sampling = SamplingParams(max_tokens=14, temperature=1.0, seed=3, ignore_eos=True)
    results = test_thoughts.run(engine, {
        "free": ([1, 2, 3, think], sampling, ComputeParams(max_thought_tokens=3, include_thoughts=True)),
        "guided": ([1, 2, 3, think], constrained(3), ComputeParams(max_thought_tokens=3, include_thoughts=True)),
        # Not prompted to think: <think> stays allowed before the content, once (logit_bias picks it).
        "opens": ([1, 2, 3], SamplingParams(max_tokens=14, temperature=1.0, seed=3, logit_bias={think: 100.0},
                                            structured_outputs=StructuredOutputs(regex=REGEX)),
                  ComputeParams(max_thought_tokens=2)),
    })
    free, guided = results["free"], results["guided"]
    assert guided["reasoning"] == free["reasoning"] and free["thoughts"] == guided["thoughts"] == 3  # sampled as if free
    assert not re.fullmatch("[a-cx]*", guided["reasoning"])  # and not held to the grammar's alphabet
    assert re.fullmatch(REGEX, guided["text"])
    opens = results["opens"]
    assert opens["tokens"][0] == think and opens["thoughts"] == 2 and re.fullmatch(REGEX, opens["text"])


def test_grammar_completion_stops_and_eos_is_allowed_where_the_grammar_may_end():
    engine = fused(make_engine())
    choice = SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=StructuredOutputs(choice=["ab", "ba"]))
    engine.add_request("choice", [1, 2], choice)
    # Where the grammar may go on or end, EOS (the stop id) is one of the allowed tokens.
    open_ended = SamplingParams(max_tokens=40, temperature=1.0, seed=1, logit_bias={63: 5.0},
                                structured_outputs=StructuredOutputs(regex="[a-c]+"))
    engine.add_request("open", [1, 2], open_ended)
    out = drain(engine)
    assert out["choice"]["text"] in ("ab", "ba") and out["choice"]["finish"] == "stop" and len(out["choice"]["tokens"]) == 2
    assert out["open"]["tokens"][-1] == 63 and out["open"]["finish"] == "stop"
    assert re.fullmatch("[a-c]+", out["open"]["text"])


def test_bad_specs_are_refused_by_the_validator():
    engine = make_engine()
    for spec, param in [(StructuredOutputs(regex="("), "structured_outputs.regex"),
                        (StructuredOutputs(json='{"type": 3}'), "structured_outputs.json"),
                        (StructuredOutputs(regex="a", choice=["b"]), "structured_outputs"),
                        (StructuredOutputs(choice=["x"], source="guided_choice", regex="y"), "guided_choice")]:
        with pytest.raises(ParamError) as e:
            engine.add_request("bad", [1], SamplingParams(structured_outputs=spec))
        assert e.value.param == param
    assert not engine.has_unfinished()


def test_bitmask_keeps_exactly_the_allowed_logits_of_its_rows():
    vocab, gen = 70, torch.Generator().manual_seed(0)  # not a multiple of 32: the last word is partial
    logits = torch.randn(4, vocab, generator=gen)
    allowed = torch.rand(2, vocab, generator=gen) < 0.3
    allowed[:, 31] = allowed[:, 63] = True  # the sign bit of a word
    words = torch.zeros(2, 3, dtype=torch.int64)
    for t in allowed.nonzero().tolist():
        words[t[0], t[1] // 32] |= 1 << (t[1] % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    out = logits.clone()
    apply_bitmask(out, [1, 3], bitmask)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])  # rows without a constraint are untouched
    for k, row in enumerate([1, 3]):
        assert torch.equal(out[row][allowed[k]], logits[row][allowed[k]])
        assert torch.isneginf(out[row][~allowed[k]]).all()


def test_a_checkpoint_not_trained_to_think_may_not_open_a_thought_under_a_grammar():
    engine = fused(test_thoughts.make_engine())  # think ids, but no default_thought_tokens
    sampling = SamplingParams(max_tokens=14, temperature=1.0, seed=3, logit_bias={test_thoughts.THINK: 100.0},
                              structured_outputs=StructuredOutputs(regex=REGEX))
    out = test_thoughts.run(engine, {"r": ([1, 2, 3], sampling, ComputeParams())})["r"]
    assert test_thoughts.THINK not in out["tokens"] and re.fullmatch(REGEX, out["text"])
