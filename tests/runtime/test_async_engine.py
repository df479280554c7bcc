import asyncio
import threading
import time

import pytest

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.params import ComputeParams, ParamError, SamplingParams
from tests.runtime.test_engine import make_engine


def test_concurrent_streams_disconnects_and_no_leaks():
    engine = AsyncEngine(make_engine(max_num_seqs=4, num_kv_blocks=40))

    async def consume(i: int, stop_after: int | None):
        got, depths = [], []
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        async for out in engine.generate(f"r{i}", [1 + i, 2, 3], params, ComputeParams(compute_budget=0.5 + 0.05 * i)):
            got += out.new_token_ids
            depths += out.exit_depths
            if stop_after is not None and len(got) >= stop_after:
                break  # the client went away mid-stream
        return got, depths, out

    async def main():
        return await asyncio.gather(*(consume(i, 3 if i % 3 == 0 else None) for i in range(9)))

    results = asyncio.run(main())
    for i, (tokens, depths, last) in enumerate(results):
        assert len(depths) == len(tokens)
        if i % 3:
            assert len(tokens) == 12 and last.finished and last.finish_reason == "length"
        else:
            assert 3 <= len(tokens) < 12
    health = engine.health()
    assert health["healthy"] and health["num_running"] == 0 and health["kv_cache_usage"] == 0
    engine.shutdown()


def test_bad_requests_raise_in_the_caller_and_harm_nobody():
    engine = AsyncEngine(make_engine())

    async def main():
        with pytest.raises(ParamError):
            async for _ in engine.generate("bad", [1], SamplingParams(), ComputeParams(compute_budget=2.0)):
                pass
        outs = [o async for o in engine.generate("good", [1, 2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 4
    engine.shutdown()


def test_requests_arriving_during_a_step_wait_in_the_inbox_not_on_the_event_loop():
    """generate() and abort() must not wait for a running step (the engine thread holds the lock for
    one): requests that arrive together are then admitted into the same step."""
    engine = AsyncEngine(make_engine(max_num_seqs=8))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    holding, release = threading.Event(), threading.Event()

    def long_step():  # another thread holds the engine lock, as the engine thread does during a step
        with engine._lock:
            holding.set()
            release.wait(timeout=5)

    async def main():
        holder = threading.Thread(target=long_step)
        holder.start()
        holding.wait()
        started = time.monotonic()
        streams = [engine.generate(f"r{i}", [1 + i, 2, 3], params) for i in range(4)]
        await engine.abort("r3")
        waited = time.monotonic() - started
        added = engine.engine.scheduler.num_waiting
        release.set()
        holder.join()
        assert waited < 0.5 and added == 0  # nothing waited for the lock; the engine thread adds them
        return [[out async for out in s] for s in streams[:3]]

    outs = asyncio.run(main())
    assert all(sum(len(o.new_token_ids) for o in seq) == 4 and seq[-1].finished for seq in outs)
    assert engine.engine.scheduler.num_running == 0 and not engine.engine.has_unfinished()
