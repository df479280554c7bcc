"""The sampler draws from the filtered distribution: frequencies match the probabilities, filtered
tokens never come up, seeded rows do not depend on their neighbours, and the top-k search of the
filters keeps exactly the tokens a full sort keeps."""

import math

import torch

from runtime.engine.params import SamplingParams
from runtime.engine.sampler import SampleRow, _filter, sample


def row(seed: int = 0, **params) -> SampleRow:
    return SampleRow(SamplingParams(max_tokens=1, **params), [], [], torch.Generator().manual_seed(seed), [])


def test_frequencies_follow_the_probabilities_and_filtered_tokens_never_come_up():
    V = 300
    logits = torch.full((1, V), -30.0)
    logits[0, [7, 42, 250, 3]] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    r = row(seed=1, temperature=1.0, top_k=3)
    counts = torch.zeros(V)
    for _ in range(4000):
        counts[sample(logits, [r])[0].token_id] += 1
    assert counts[[7, 42, 250]].sum() == 4000  # token 3 is past top_k, the rest are ~0 probability
    want = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    assert torch.allclose(counts[[7, 42, 250]] / 4000, want, atol=0.03)


def test_a_seeded_row_ignores_its_neighbours_and_logprobs_are_normalised():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000)
    alone_row = row(seed=5, temperature=0.9, top_p=0.95)
    alone = [sample(logits[1:2], [alone_row])[0].token_id for _ in range(20)]
    rows = [row(temperature=0.0), row(seed=5, temperature=0.9, top_p=0.95), row(seed=9, temperature=1.3)]
    mixed = [sample(logits, rows) for _ in range(20)]
    assert [m[1].token_id for m in mixed] == alone and len(set(alone)) > 5  # the same 20 draws, from a wide nucleus
    assert all(m[0].token_id == int(logits[0].argmax()) for m in mixed)
    for s, lg in zip(mixed[0], logits):
        assert math.isclose(s.logprob, float(torch.log_softmax(lg, -1)[s.token_id]), rel_tol=1e-5, abs_tol=1e-5)


def full_sort_filter(logits, top_k, top_p, min_p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(logits.shape[-1])[None]
    drop = (rank >= top_k) | (probs < min_p * probs[:, :1])
    if top_p < 1:
        drop |= (probs.cumsum(-1) - probs) >= top_p
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def test_top_k_search_keeps_what_a_full_sort_keeps():
    torch.manual_seed(0)
    V = 5000
    for scale in (0.5, 3.0, 12.0):  # flat (the search grows to the whole vocabulary) to peaked
        logits = torch.randn(4, V) * scale
        for top_k, top_p, min_p in [(20, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.05), (2000, 0.95, 0.01), (0, 0.5, 0.2)]:
            rows = [row(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)] * 4
            got = _filter(logits, rows)
            want = full_sort_filter(logits, top_k or V, top_p, min_p)
            assert torch.equal(got.isinf(), want.isinf()), (scale, top_k, top_p, min_p)
            assert torch.equal(got[~got.isinf()], logits[~want.isinf()])
    unfiltered = torch.randn(2, V)
    assert torch.equal(_filter(unfiltered, [row(temperature=1.0)] * 2), unfiltered)
