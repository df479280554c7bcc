"""Exit adapters and the exit head of an imported model, trained from cached states."""


import pytest
import torch

pytest.importorskip("transformers")

from runtime.llama_import import import_llama, ponder_config  # noqa: E402
from tests.pretrained.test_llama_import import tiny_llama  # noqa: E402
from training.adapt_exits import AdaptConfig, cache_states, kl_to_final, train_exits  # noqa: E402
from training.exit_eval import calm_depths, calm_threshold, compute_fraction  # noqa: E402


@pytest.fixture(scope="module")
def model_and_states():
    hf = tiny_llama(vocab_size=256, seed=3)
    model = import_llama(hf, ponder_config(hf.config, min_depth=1, exit_adapter_rank=8))
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return model, cache_states(model, ids, first_depth=1, batch=4)


def mean_kl(model, states, first):
    D = model.cfg.max_depth
    with torch.no_grad():
        flat = states.flatten(0, 1).float()
        teacher = torch.log_softmax(model.head(model.norm(flat[:, D - first])), -1)
        return {d: float(kl_to_final(model, flat[:, d - first], d, teacher).mean()) for d in range(first, D)}


def test_cached_states_are_the_full_depth_states(model_and_states):
    model, states = model_and_states
    assert states.shape == (8, 32, model.cfg.max_depth, 64) and states.dtype == torch.bfloat16
    with torch.no_grad():
        ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
        final = model.norm(states[..., -1, :].float())
        want = model(ids).logits
    assert torch.allclose(model.head(final), want, atol=0.05)  # bf16 storage of the state


def test_training_reduces_kl_and_fits_the_exit_head(model_and_states):
    model, states = model_and_states
    before = mean_kl(model, states, 1)
    cfg = AdaptConfig(min_depth=1, steps=60, tokens_per_step=128, depths_per_step=3, lr=1e-2, bf16=False)
    history = train_exits(model, states, cfg, log_every=20)
    after = mean_kl(model, states, 1)
    assert all(after[d] < 0.8 * before[d] for d in before), (before, after)
    assert history[-1]["value_loss"] < history[0]["value_loss"]
    # The value head ranks depths: it predicts more remaining gain for shallower exits, as the KL does.
    with torch.no_grad():
        h = states.flatten(0, 1).float()
        pred = {d: float(model.exit_head(h[:, d - 1], d).mean()) for d in (1, 3)}
    assert (pred[1] > pred[3]) == (after[1] > after[3])
    assert not any(p.requires_grad for p in model.parameters())


def test_calm_threshold_hits_the_budget_and_depths_respect_min_depth():
    conf = torch.rand(10, 4, 50, generator=torch.Generator().manual_seed(0))
    for budget in (0.9, 0.6, 0.4):
        t = calm_threshold(conf, budget, min_depth=2)
        depth = calm_depths(conf, t, 2)
        assert abs(depth.float().mean().item() / 10 - budget) < 0.02
        assert depth.min() >= 2
    assert calm_depths(conf, 2.0, 2).eq(10).all()  # an unreachable threshold: everyone runs full depth


def test_compute_fraction_charges_calm_for_full_vocabulary_tests():
    cfg = ponder_config(tiny_llama(vocab_size=4096).config, min_depth=1, exit_adapter_rank=8)
    depth = torch.full((10,), 2)
    assert compute_fraction(cfg, torch.full((10,), cfg.max_depth), "logit-lens") == pytest.approx(1.0)
    assert compute_fraction(cfg, depth, "calm") > compute_fraction(cfg, depth, "exit-head") > compute_fraction(cfg, depth, "logit-lens")
