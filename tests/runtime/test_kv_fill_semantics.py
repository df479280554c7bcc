"""The batched reference forward against a token-by-token oracle written from the kv_fill table of docs/architecture.md.

The oracle decodes one position at a time with explicit per-slot KV lists: an active token
writes its own block's entry at each slot it runs; after it exits, its deeper slots are filled
by the checkpoint's `kv_fill` rule. Matching it checks each policy's attention semantics.
"""

import pytest
import torch

from runtime.config import ModelConfig
from runtime.model import ExitSpec, PonderModel


def oracle(model: PonderModel, ids: list[int], price: float | None = None, depths: list[int] | None = None):
    cfg, D = model.cfg, model.cfg.max_depth
    pre = [[] for _ in model.prelude]
    core = [[] for _ in range(D)]
    coda = [[] for _ in model.coda]
    logits, out_depths, paths = [], [], []

    def choose(h_step, s):
        return int(model.route_logits(h_step).argmax(-1)) if model.router is not None else model.scheduled_block(s)

    def entry(h, s):  # the K/V a state writes at slot s through the block it would use there
        h_step = model.step_input(h, s)
        b = choose(h_step, s)
        return model.pool[b].kv(model.block_input(h_step, b), cos, sin)

    def run(block, x, cache):
        cache.append(block.kv(x, cos, sin))
        return attend(block, x, cache)

    def attend(block, x, cache):
        k, v = torch.cat([e[0] for e in cache], 2), torch.cat([e[1] for e in cache], 2)
        return block.forward_with_kv(x, k, v, cos, sin, torch.ones(1, k.shape[2], dtype=torch.bool))

    for i, tok in enumerate(ids):
        cos, sin = model.rope(torch.tensor([i]))
        h = model.embed(torch.tensor([[tok]]))
        for blk, cache in zip(model.prelude, pre):
            h = run(blk, h, cache)
        depth, path = 0, []
        for s in range(D):
            h_step = model.step_input(h, s)
            gain = float(model.exit_score(h_step, s))
            if depths is not None and s >= depths[i]:
                break
            if depths is None and price is not None and s >= cfg.min_depth and gain < price:
                break
            b = choose(h_step, s)
            x = model.block_input(h_step, b)
            if cfg.kv_fill == "shared" and s > 0:
                core[s].append(core[0][i])
            else:
                core[s].append(model.pool[b].kv(x, cos, sin))
            h = attend(model.pool[b], x, core[s])
            depth, path = depth + 1, path + [b]
        for s in range(depth, D):  # slots the token never ran
            if cfg.kv_fill == "propagate" or depth == 0 and s == 0:
                core[s].append(entry(h, s))
            elif cfg.kv_fill == "latest":
                core[s].append(core[depth - 1][i] if depth > 0 else core[0][i])
            else:  # shared
                core[s].append(core[0][i])
        for blk, cache in zip(model.coda, coda):
            h = run(blk, h, cache)
        logits.append(model.head(model.norm(h))[0, 0])
        out_depths.append(depth)
        paths.append(path + [-1] * (D - depth))
    return torch.stack(logits), torch.tensor(out_depths), torch.tensor(paths)


CASES = [
    ("tiny", {}),
    ("tiny", dict(n_pool=3, max_depth=3)),
    ("tiny", dict(schedule="recurrent", n_pool=1, max_depth=3)),
    ("tiny", dict(schedule="routed", n_pool=3, max_depth=4, n_prelude=0)),
]


@pytest.mark.parametrize("kv_fill", ["propagate", "latest", "shared"])
@pytest.mark.parametrize("preset, overrides", CASES)
def test_reference_forward_matches_token_by_token_oracle(preset, overrides, kv_fill):
    torch.manual_seed(1)
    model = PonderModel(ModelConfig.from_name(preset, kv_fill=kv_fill, **overrides)).eval()
    D = model.cfg.max_depth
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    explicit = torch.randint(0, D + 1, (1, 12))
    with torch.no_grad():
        for spec in (ExitSpec(depths=explicit), ExitSpec()):
            out = model(ids, spec)
            ref_logits, ref_depth, ref_path = oracle(model, ids[0].tolist(), depths=spec.depths[0].tolist() if spec.depths is not None else None)
            assert out.depth[0].tolist() == ref_depth.tolist()
            assert out.path[0].tolist() == ref_path.tolist()
            torch.testing.assert_close(out.logits[0], ref_logits, rtol=1e-4, atol=1e-5)
        # A price: the exit head decides per token. Pick one that gives a spread of depths.
        scores = model(ids).exit_scores
        price = float(scores.median())
        out = model(ids, ExitSpec(price=price))
        ref_logits, ref_depth, _ = oracle(model, ids[0].tolist(), price=price)
        assert out.depth[0].tolist() == ref_depth.tolist()
        torch.testing.assert_close(out.logits[0], ref_logits, rtol=1e-4, atol=1e-5)


def test_explicit_depths_are_taken_exactly_and_reported_honestly():
    torch.manual_seed(2)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=4, max_depth=4, n_prelude=0, n_coda=0)).eval()
    ids = torch.randint(0, 64, (2, 10))
    depths = torch.randint(0, 5, (2, 10))
    with torch.no_grad():
        out = model(ids, ExitSpec(depths=depths))
        assert torch.equal(out.depth, depths)
        assert torch.equal((out.path >= 0).sum(-1), depths)
        # Position 0 attends only to itself: its exit state is exactly `depth` block applications.
        cos, sin = model.rope(torch.tensor([0]))
        for row in range(2):
            h = model.embed(ids[row : row + 1, :1])
            for s in range(int(depths[row, 0])):
                h = model.pool[s](model.block_input(model.step_input(h, s), s), cos, sin)
            torch.testing.assert_close(out.exit_state[row, 0], h[0, 0], rtol=1e-5, atol=1e-6)


def test_shared_fill_reads_only_slot_zero_projections():
    torch.manual_seed(3)
    model = PonderModel(ModelConfig.from_name("tiny", kv_fill="shared", n_pool=3, max_depth=3)).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        for blk in model.pool[1:]:  # deeper blocks' K/V projections are never used
            blk.attn.wk.weight.normal_()
            blk.attn.wv.weight.normal_()
        torch.testing.assert_close(model(ids).logits, before)
        model.pool[0].attn.wk.weight.normal_()
        assert not torch.allclose(model(ids).logits, before)


def test_price_zero_is_full_depth_and_high_price_respects_min_depth():
    torch.manual_seed(4)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=3, max_depth=3, min_depth=1)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert (model(ids, ExitSpec(price=0.0)).depth == 3).all()
        assert (model(ids, ExitSpec(price=1e9)).depth == 1).all()
        assert (model(ids, ExitSpec(price=1e9, min_depth=2)).depth == 2).all()
        assert (model(ids, ExitSpec(price=0.0, max_depth=2)).depth == 2).all()
