"""A decode step's layers in one native call each (runtime/decode_layer.py) give the separate calls'
logits, depths and cache entries bit for bit, with rows leaving the core and rows going on."""

import random

import pytest
import torch

from runtime import attention, layers, native
from runtime.config import ModelConfig
from runtime.engine import executor as executor_module
from runtime.engine.executor import Executor, SeqInput
from runtime.engine.kv_cache import PagedKVCache
from runtime.model import PonderModel

pytestmark = pytest.mark.skipif(not native.available(torch.float32, torch.device("cpu")),
                                reason="no C compiler here: the native kernels are not built")


@pytest.fixture
def native_kernels():
    """Every linear of up to 16 rows on the native kernel, decode attention on the cache in place."""
    linear, attn = layers._mode, attention._mode
    layers.set_linear_kernel("native")
    attention.set_attention_kernel("paged")
    yield
    layers.set_linear_kernel(linear)
    attention.set_attention_kernel(attn)


def decode_twice(model: PonderModel, dtype: torch.dtype, monkeypatch, priced: str = "half") -> tuple[list, int]:
    """Prompts cached, then one decode step run whole-layer and again call by call on the same cache.
    Returns, per run, the outputs and the cache after it; and the number of whole-layer calls."""
    cache = PagedKVCache(model.cfg, num_blocks=64, block_size=4, device=torch.device("cpu"), dtype=dtype)
    executor = Executor(model, cache)
    rng = random.Random(0)
    free = list(range(64))
    rng.shuffle(free)
    lengths = (9, 3, 14, 6, 11)
    tables = [[free.pop() for _ in range(5)] for _ in lengths]
    for n, table in zip(lengths, tables):
        executor.run([SeqInput([rng.randrange(64) for _ in range(n)], 0, table)])
    with torch.no_grad():
        scores = model.exit_score(model.embed(torch.arange(64)).to(dtype), 1).float()
    # half: every other row priced, about half of those leaving at each priced step; all: every row
    # leaves at its min depth, and the deeper layers only take their fill entries
    price = float(scores.median()) if priced == "half" else float(scores.max()) + 1
    step = [SeqInput([rng.randrange(64)], n, table, price=price if priced == "all" or i % 2 else None)
            for i, (n, table) in enumerate(zip(lengths, tables))]
    calls = []
    whole = executor_module.decode_layer
    monkeypatch.setattr(executor_module, "decode_layer", lambda *a, **k: calls.append(1) or whole(*a, **k))
    fused = executor.run(step), cache.k.clone(), cache.v.clone()
    monkeypatch.setattr(executor_module, "runs_whole", lambda *a: False)
    separate = executor.run(step), cache.k.clone(), cache.v.clone()
    return [fused, separate], len(calls)


@pytest.mark.parametrize("priced", ["half", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_layers_are_the_separate_calls_bit_for_bit(dtype, priced, native_kernels, monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", n_pool=4, max_depth=4, n_prelude=1, n_coda=1, min_depth=1, kv_fill="propagate")
    model = PonderModel(cfg).eval().to(dtype)
    (fused, separate), calls = decode_twice(model, dtype, monkeypatch, priced)
    (outs_a, k_a, v_a), (outs_b, k_b, v_b) = fused, separate
    assert calls >= cfg.n_prelude + cfg.n_coda + 1  # the prelude, the coda and core steps ran whole
    for a, b in zip(outs_a, outs_b):
        assert a.depths == b.depths
        assert torch.equal(a.logits, b.logits)
    assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)  # exited rows' fill entries included
    depths = [d for out in outs_a for d in out.depths]
    if priced == "half":
        assert len(set(depths)) > 1  # some rows left the core while others went on
    else:
        assert depths == [cfg.min_depth] * len(depths) and calls == cfg.n_prelude + cfg.n_coda + cfg.max_depth


def test_whole_layers_step_aside_where_a_piece_is_not_native(native_kernels, monkeypatch):
    """A linear measured off the native kernel at its row count: the layer runs call by call."""
    torch.manual_seed(1)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=2, max_depth=2)).eval()
    monkeypatch.setattr("runtime.decode_layer.kernel_rows", lambda linear: 0)
    (fused, separate), calls = decode_twice(model, torch.float32, monkeypatch)
    assert calls == 0
    for a, b in zip(fused[0], separate[0]):
        assert torch.equal(a.logits, b.logits)


def test_warm_up_measures_how_many_rows_one_call_takes(monkeypatch):
    """Timed both ways at NATIVE_ROWS rows: the count is one of them (or 0), and it is what the executor asks."""
    from runtime import decode_layer

    monkeypatch.setattr(decode_layer, "_measured", {})
    torch.manual_seed(2)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=2, max_depth=2)).eval()
    executor = Executor(model, PagedKVCache(model.cfg, num_blocks=64, block_size=4, device=torch.device("cpu"),
                                            dtype=torch.float32))
    calls = executor.warm_up(max_rows=32, max_seqs=4, max_len=64)
    rows = calls["whole_layer_rows"]
    assert rows in (0, *layers.NATIVE_ROWS)
    assert all(decode_layer.whole_rows(block) == rows for block in model.pool)
    layers.set_linear_kernel("aten")  # a forced kernel: no whole layers, whatever was measured
    try:
        assert all(decode_layer.whole_rows(block) == 0 for block in model.pool)
    finally:
        layers.set_linear_kernel("auto")
