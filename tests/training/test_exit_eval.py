"""eval-exits: every exit signal at every budget, the hindsight bound, and the quality it publishes."""

import pytest
import torch

from runtime.checkpoint import load_checkpoint
from training.exit_eval import evaluate_exits, record_quality
from training.exit_signals import latent_scores, oracle_depths, train_classifier


def test_oracle_trades_nll_for_depth_at_the_budget():
    # Token 0 gains nothing past depth 1; token 1 needs depth 3 to be right.
    nll = torch.tensor([[9.0, 9.0], [1.0, 9.0], [1.0, 8.0], [1.0, 0.5], [1.0, 0.5]])[:, :, None]  # (D+1=5, N=2, T=1)
    depth = oracle_depths(nll, budget_layers=2.0, min_depth=1)
    assert depth.flatten().tolist() == [1, 3]
    assert oracle_depths(nll, budget_layers=4.0, min_depth=1).float().mean() <= 4.0
    assert oracle_depths(nll, budget_layers=0.5, min_depth=1).min() >= 1  # never below min_depth


def test_latent_score_is_minus_the_relative_change():
    states = torch.stack([torch.ones(2, 3, 4), 2 * torch.ones(2, 3, 4), 2 * torch.ones(2, 3, 4), torch.ones(2, 3, 4)])
    score = latent_scores(states)  # (D=3, N, T)
    assert score.shape == (3, 2, 3)
    assert score[0].eq(-float("inf")).all()
    assert torch.allclose(score[1], torch.tensor(-1.0)) and torch.allclose(score[2], torch.tensor(0.0))


def test_agreement_classifier_learns_a_separable_label():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(4, 8, 16, 6, generator=g)  # (D+1, N, T, d)
    agree = states[:3, ..., 0] > 0  # depth d agrees when the state's first feature is positive
    clf = train_classifier(states, agree, min_depth=1, steps=200, lr=0.1)
    predicted = clf(states[:3]) > 0
    assert (predicted[1:] == agree[1:]).float().mean() > 0.95


def test_eval_exits_compares_every_signal_and_records_the_quality(adapted):
    path, _ = adapted
    result = evaluate_exits(path, budgets=[1.0, 0.6], n_windows=4, window=33, kv_fill_budget=1.0)
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"full", "exit-head", "exit-head-full-kv", "calm", "classifier", "latent", "oracle", "oracle-kl",
                       "adapters", "logit-lens"}
    for row in result["rows"]:
        assert row["mean_layers"] >= 1 and row["ppl"] > 0  # min_depth 1
    oracle_kl = next(r for r in result["rows"] if r["method"] == "oracle-kl")
    static = next(r for r in result["rows"] if r["method"] == "adapters")
    assert oracle_kl["top1_agreement"] >= static["top1_agreement"] - 0.05  # hindsight tracks full depth at least as well
    cal = record_quality(path, result)
    assert [q["budget"] for q in cal.quality] == [1.0, 0.6]
    assert cal.quality[0]["ppl_increase"] == pytest.approx(0.0)
    assert "Persuasion" in cal.quality_measured_on
    assert load_checkpoint(path).calibration.quality == cal.quality  # it is on disk, where the server reads it
