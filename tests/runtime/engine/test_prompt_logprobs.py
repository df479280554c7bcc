"""Prompt logprobs (what echo scoring needs): the engine against the reference forward."""

import pytest
import torch

from runtime.engine.params import ComputeParams, SamplingParams
from runtime.model import ExitSpec
from tests.runtime.engine.test_engine import make_engine


def run(engine, prompts, n=3, compute=None):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=n),
                           compute or ComputeParams())
    got = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got  # delivered once
                got[out.request_id] = (out.prompt_logprobs, out.output.prompt_depths)
    return [got[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("chunk", [64, 5])  # whole prompts in one step, and chunked prefill across steps
def test_prompt_logprobs_match_the_reference_forward(chunk):
    engine = make_engine(max_num_batched_tokens=chunk, max_num_seqs=min(8, chunk))
    prompts = [torch.randint(0, 63, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 7, 1)]
    results = run(engine, prompts)
    for prompt, (logprobs, depths) in zip(prompts, results):
        assert len(logprobs) == len(depths) == len(prompt) - 1
        if len(prompt) < 2:
            continue
        with torch.no_grad():
            ref = torch.log_softmax(engine.ckpt.model(torch.tensor([prompt])).logits[0].float(), -1)
        for p, lp in enumerate(logprobs):
            assert lp.token_id == prompt[p + 1]
            assert lp.logprob == pytest.approx(float(ref[p, prompt[p + 1]]), abs=1e-4)
            assert [t for t, _ in lp.top_logprobs] == ref[p].topk(3).indices.tolist()
        assert set(depths) == {3}
    assert engine.scheduler.kv_usage() == 0


def test_prompt_logprobs_at_a_price_use_each_positions_exit():
    engine = make_engine()
    prompt = torch.randint(0, 63, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    price = float(engine.ckpt.calibration.price_for_budget(0.5))
    ((logprobs, depths),) = run(engine, [prompt], n=0, compute=ComputeParams(exit_price=price))
    with torch.no_grad():
        out = engine.ckpt.model(torch.tensor([prompt]), ExitSpec(price=price))
    ref = torch.log_softmax(out.logits[0].float(), -1)
    assert depths == out.depth[0, :-1].tolist() and len(set(depths)) > 1
    assert [lp.logprob for lp in logprobs] == pytest.approx([float(ref[p, prompt[p + 1]]) for p in range(15)], abs=1e-4)
    assert all(lp.top_logprobs == [] for lp in logprobs)


def test_prompt_logprobs_are_validated():
    from runtime.engine.params import ParamError

    with pytest.raises(ParamError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
