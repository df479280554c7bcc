"""Invariant 1: the engine's executor (paged KV, batching, chunked prefill, every kv_fill) gives
the reference forward's logits and depths for the same exits."""

import random

import pytest
import torch

from runtime import attention
from runtime.flash_attention import flash_available
from runtime.config import ModelConfig
from runtime.engine.executor import Executor, SeqInput
from runtime.engine.kv_cache import PagedKVCache
from runtime.model import ExitSpec, PonderModel

BLOCK = 4
CASES = [
    ("tiny", dict(n_pool=3, max_depth=3)),
    ("tiny", dict(schedule="recurrent", n_pool=1, max_depth=3)),
    ("tiny", dict(schedule="routed", n_pool=3, max_depth=4, n_prelude=0)),
]


def run_chunked(model, prompts, exit_for, rng: random.Random, make_executor=Executor, cache_dtype=torch.float32):
    """Feed the prompts through the executor in random chunks, several sequences per iteration,
    with scattered block tables. Returns per-sequence (logits (T, V), depths)."""
    cache = PagedKVCache(model.cfg, num_blocks=128, block_size=BLOCK, device=torch.device("cpu"), dtype=cache_dtype)
    executor = make_executor(model, cache)
    free = list(range(128))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-len(p) // BLOCK))] for p in prompts]
    done = [0] * len(prompts)
    logits = [[] for _ in prompts]
    depths = [[] for _ in prompts]
    while any(d < len(p) for d, p in zip(done, prompts)):
        batch, who = [], []
        for i, p in enumerate(prompts):
            if done[i] < len(p) and rng.random() < 0.7:
                n = min(len(p) - done[i], rng.choice([1, 1, 2, 3, 5, 8]))
                batch.append(SeqInput(p[done[i] : done[i] + n], done[i], tables[i], **exit_for(i, done[i], n)))
                who.append(i)
                done[i] += n
        if not batch:
            continue
        for i, out in zip(who, executor.run(batch, all_logits=True)):
            logits[i].append(out.logits)
            depths[i] += out.depths
    return [(torch.cat(l), d) for l, d in zip(logits, depths)], executor


@pytest.fixture
def attention_kernel(request):
    """Force one CPU attention kernel (runtime/attention.py) for the test, then restore the mode."""
    mode = attention._mode
    attention.set_attention_kernel(request.param)
    yield request.param
    attention.set_attention_kernel(mode)


@pytest.mark.parametrize("attention_kernel", ["sdpa", "sdpa_fp32", "grouped", "paged"], indirect=True)
@pytest.mark.parametrize("kv_fill", ["propagate", "latest", "shared"])
@pytest.mark.parametrize("preset, overrides", CASES)
def test_executor_matches_reference_with_explicit_depths(preset, overrides, kv_fill, attention_kernel):
    torch.manual_seed(0)
    rng = random.Random(0)
    model = PonderModel(ModelConfig.from_name(preset, kv_fill=kv_fill, **overrides)).eval()
    D = model.cfg.max_depth
    prompts = [[rng.randrange(64) for _ in range(n)] for n in (13, 7, 20, 1)]
    forced = [[rng.randint(0, D) for _ in p] for p in prompts]
    results, executor = run_chunked(model, prompts, lambda i, start, n: dict(depths=forced[i][start : start + n]), rng)
    with torch.no_grad():
        for p, f, (logits, depths) in zip(prompts, forced, results):
            ref = model(torch.tensor([p]), ExitSpec(depths=torch.tensor([f])))
            assert depths == f == ref.depth[0].tolist()
            torch.testing.assert_close(logits, ref.logits[0], rtol=1e-4, atol=1e-5)
    assert executor.num_block_calls == sum(map(sum, forced))  # honest accounting


@pytest.mark.parametrize("kv_fill", ["propagate", "latest", "shared"])
def test_executor_matches_reference_with_per_request_prices(kv_fill):
    torch.manual_seed(1)
    rng = random.Random(1)
    model = PonderModel(ModelConfig.from_name("tiny", kv_fill=kv_fill, n_pool=4, max_depth=4)).eval()
    prompts = [[rng.randrange(64) for _ in range(n)] for n in (11, 16, 6)]
    with torch.no_grad():
        scores = model(torch.tensor([prompts[1]])).exit_scores
    prices = [float(scores.quantile(q)) for q in (0.3, 0.5, 0.8)]  # a different price per request
    results, _ = run_chunked(model, prompts, lambda i, start, n: dict(price=prices[i]), rng)
    with torch.no_grad():
        for p, price, (logits, depths) in zip(prompts, prices, results):
            ref = model(torch.tensor([p]), ExitSpec(price=price))
            assert depths == ref.depth[0].tolist()
            torch.testing.assert_close(logits, ref.logits[0], rtol=1e-4, atol=1e-5)
    assert len({d for _, ds in results for d in ds}) > 1  # exits really differ per token


def test_core_step_cost_scales_with_active_rows():
    torch.manual_seed(2)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=4, max_depth=4)).eval()
    cache = PagedKVCache(model.cfg, num_blocks=16, block_size=BLOCK, device=torch.device("cpu"), dtype=torch.float32)
    executor = Executor(model, cache)
    calls = []
    for blk in model.pool:
        blk.mlp.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    depths = [0, 1, 1, 2, 4, 4, 4, 3]
    executor.run([SeqInput(list(range(8)), 0, [0, 1], depths=depths)])
    # Step s runs only the rows deeper than s: no padding to the batch, nothing decided for all rows.
    assert calls == [sum(d > s for d in depths) for s in range(4)]
    assert executor.num_block_calls == sum(depths)
    assert executor.num_batched_calls == 4  # one call per step that still has rows


@pytest.mark.parametrize("attention_kernel", ["sdpa"], indirect=True)  # not a measured choice: paged decode rows
def test_a_mixed_step_attends_in_one_call_per_prompt_bucket_and_one_for_single_rows(monkeypatch, attention_kernel):
    """Five prompts (two length buckets), a chunk after cached context and three decode rows: 4 attention
    calls per layer, not 9; and every sequence gets the logits it gets alone. (SDPA forced: where the
    measured choice reads decode rows in place, prompt tails join them and the count differs.)"""
    from runtime.engine import executor as executor_module

    torch.manual_seed(4)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=2, max_depth=2, max_seq_len=512)).eval()
    cache = PagedKVCache(model.cfg, num_blocks=450, block_size=BLOCK, device=torch.device("cpu"), dtype=torch.float32)
    executor = Executor(model, cache)
    free = list(range(450))
    random.Random(0).shuffle(free)
    tables = [[free.pop() for _ in range(50)] for _ in range(9)]
    cached = (9, 12, 4, 20)  # context of the chunk (sequence 5) and of the decode rows (6-8)
    for table, n in zip(tables[5:], cached):
        executor.run([SeqInput(list(range(1, n + 1)), 0, table)])
    step = [SeqInput([(3 + j) % 60 for j in range(n)], 0, tables[i]) for i, n in enumerate((5, 30, 130, 17, 200))]
    step += [SeqInput([7, 8, 9], 9, tables[5])] + [SeqInput([11], n, t) for n, t in zip(cached[1:], tables[6:])]
    calls = []
    attend = executor_module.attend
    monkeypatch.setattr(executor_module, "attend", lambda q, *a, **k: calls.append(q.shape[0]) or attend(q, *a, **k))
    batched = executor.run(step, all_logits=True)
    layers = model.cfg.n_prelude + model.cfg.max_depth + model.cfg.n_coda
    assert len(calls) == 4 * layers and sorted(calls[:4]) == [1, 2, 3, 3]  # prompts 3 + 2, the chunk, 3 rows
    for seq, out in zip(step, batched):  # alone: the same entries are rewritten in place
        torch.testing.assert_close(out.logits, executor.run([seq], all_logits=True)[0].logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention_kernel", ["paged"], indirect=True)
def test_a_prompts_last_rows_past_its_blocks_attend_as_single_rows_and_match_the_reference(monkeypatch,
                                                                                          attention_kernel):
    """With single rows on the cache in place, a 134-token prompt runs one causal block and its last 6
    rows among the single rows (a 200-token prompt, 72 past its block, keeps a padded second block);
    the logits stay the reference forward's."""
    from runtime.engine import executor as executor_module

    torch.manual_seed(5)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=2, max_depth=2, max_seq_len=512)).eval()
    cache = PagedKVCache(model.cfg, num_blocks=200, block_size=BLOCK, device=torch.device("cpu"), dtype=torch.float32)
    executor = Executor(model, cache)
    free = list(range(200))
    random.Random(1).shuffle(free)
    prompts = [[(5 + 7 * j) % 60 for j in range(n)] for n in (134, 200, 9)]
    tables = [[free.pop() for _ in range(-(-len(p) // BLOCK))] for p in prompts]
    calls = []
    attend = executor_module.attend
    monkeypatch.setattr(executor_module, "attend", lambda q, *a, **k: calls.append(q.shape[2]) or attend(q, *a, **k))
    outs = executor.run([SeqInput(p, 0, t) for p, t in zip(prompts, tables)], all_logits=True)
    layers = model.cfg.n_prelude + model.cfg.max_depth + model.cfg.n_coda
    assert sorted(calls[:2]) == [128, 200] and len(calls) == 2 * layers  # buckets (128 + 9; 200), tails in place
    with torch.no_grad():
        for p, out in zip(prompts, outs):
            ref = model(torch.tensor([p]), ExitSpec(depths=torch.full((1, len(p)), model.cfg.max_depth)))
            torch.testing.assert_close(out.logits, ref.logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_kernel", ["flash"], indirect=True)
def test_prompts_and_chunks_on_the_flash_kernel_attend_in_one_call_over_the_cache_in_place(monkeypatch, attention_kernel):
    """Where causal rows run on the flash kernel, a step's whole prompts and chunks after context (here a
    134-token prompt, a 40-token one and a chunk of 7 after 9 cached tokens) are one call a layer over
    the cache in place: no padded prompt, no tail of single rows, no gathered keys."""
    if not flash_available(torch.bfloat16, 64):
        pytest.skip("neither AMX-BF16 nor AVX-512 BF16 here")
    from runtime.engine import executor as executor_module

    torch.manual_seed(7)
    cfg = ModelConfig.from_name("tiny", n_pool=2, max_depth=2, d_model=128, n_heads=2, n_kv_heads=1, max_seq_len=512)
    model = PonderModel(cfg).eval().to(torch.bfloat16)
    cache = PagedKVCache(model.cfg, num_blocks=64, block_size=BLOCK, device=torch.device("cpu"), dtype=torch.bfloat16)
    executor = Executor(model, cache)
    prompts = [[(5 + 7 * j) % 60 for j in range(n)] for n in (134, 40, 16)]
    tables = [list(range(0, 34)), list(range(34, 44)), list(range(44, 48))]
    executor.run([SeqInput(prompts[2][:9], 0, tables[2])])  # 9 tokens cached
    calls, gathers = [], []
    flash = executor_module.flash_paged_attention
    monkeypatch.setattr(executor_module, "flash_paged_attention", lambda *a: calls.append(a[5]) or flash(*a))
    monkeypatch.setattr(executor_module, "attend", lambda *a, **k: pytest.fail("attend: a padded or gathered call"))
    monkeypatch.setattr(cache, "gather", lambda *a: gathers.append(a))
    outs = executor.run([SeqInput(prompts[0], 0, tables[0]), SeqInput(prompts[1], 0, tables[1]),
                         SeqInput(prompts[2][9:], 9, tables[2])], all_logits=True)
    assert calls == [[134, 40, 7]] * (cfg.n_prelude + cfg.max_depth + cfg.n_coda) and not gathers
    with torch.no_grad():
        for p, out in zip(prompts, outs):
            ref = model(torch.tensor([p]), ExitSpec(depths=torch.full((1, len(p)), cfg.max_depth))).logits[0]
            torch.testing.assert_close(out.logits.float(), ref[-len(out.logits):].float(), rtol=0.05, atol=0.05)


def test_a_step_no_row_needs_makes_no_block_call():
    torch.manual_seed(3)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=4, max_depth=4)).eval()
    cache = PagedKVCache(model.cfg, num_blocks=16, block_size=BLOCK, device=torch.device("cpu"), dtype=torch.float32)
    executor = Executor(model, cache)
    # Four decode rows (one per sequence) whose deepest exit is after step 2: step 3 makes no block call.
    seqs = [SeqInput([5], 0, [i], depths=[d]) for i, d in enumerate([1, 3, 0, 2])]
    outs = executor.run(seqs)
    assert [o.depths for o in outs] == [[1], [3], [0], [2]]
    assert executor.num_batched_calls == 3 and executor.num_block_calls == 6


def test_bf16_exits_match_the_reference_at_prices_equal_to_scores():
    """Prices just above the model's own bf16 scores round to those scores in bf16: tokens sit exactly
    on the exit boundary, so the engine and the reference must compare the same way (in fp32)."""
    torch.manual_seed(4)
    rng = random.Random(4)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=4, max_depth=4)).eval().to(torch.bfloat16)
    prompts = [[rng.randrange(64) for _ in range(n)] for n in (9, 12)]
    with torch.no_grad():
        scores = model(torch.tensor([prompts[0]])).exit_scores.float()
    prices = [float(scores.flatten()[i]) + 1e-4 for i in (3, 17)]  # under half a bf16 ulp above a score
    results, _ = run_chunked(model, prompts, lambda i, start, n: dict(price=prices[i]), rng)
    with torch.no_grad():
        for p, price, (_, depths) in zip(prompts, prices, results):
            assert depths == model(torch.tensor([p]), ExitSpec(price=price)).depth[0].tolist()


@pytest.mark.parametrize("attention_kernel", ["flash"], indirect=True)
def test_bf16_prompts_and_chunks_on_the_flash_kernel_match_the_reference(attention_kernel):
    """Head dim 64 in bf16, prompts and chunks after cached context on the flash kernel, single rows
    on the paged one: the logits stay the reference forward's, within bf16's rounding."""
    if not flash_available(torch.bfloat16, 64):
        pytest.skip("neither AMX-BF16 nor AVX-512 BF16 here")
    torch.manual_seed(6)
    rng = random.Random(6)
    cfg = ModelConfig.from_name("tiny", n_pool=2, max_depth=2, d_model=128, n_heads=2, n_kv_heads=1, max_seq_len=512)
    assert cfg.head_dim == 64
    model = PonderModel(cfg).eval().to(torch.bfloat16)
    prompts = [[rng.randrange(64) for _ in range(n)] for n in (150, 40, 9)]
    results, _ = run_chunked(model, prompts, lambda i, start, n: dict(depths=[cfg.max_depth] * n), rng,
                             cache_dtype=torch.bfloat16)
    with torch.no_grad():
        for p, (logits, _) in zip(prompts, results):
            ref = model(torch.tensor([p]), ExitSpec(depths=torch.full((1, len(p)), cfg.max_depth)))
            torch.testing.assert_close(logits.float(), ref.logits[0].float(), rtol=0.05, atol=0.05)
