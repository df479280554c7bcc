import asyncio
import threading
import time

import pytest

from runtime.engine.async_llm import AsyncLLM
from runtime.engine.core_client import InprocCoreClient
from runtime.engine.params import ComputeParams, ParamError, SamplingParams
from tests.runtime.engine.test_engine import make_engine


def make_async(**engine_kwargs) -> AsyncLLM:
    engine = make_engine(**engine_kwargs)
    return AsyncLLM(InprocCoreClient(engine.core), engine.tokenizer)


def test_concurrent_streams_disconnects_and_no_leaks():
    engine = make_async(max_num_seqs=4, num_kv_blocks=40)

    async def consume(i: int, stop_after: int | None):
        got, depths = [], []
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        valid = engine.validate([1 + i, 2, 3], params, ComputeParams(compute_budget=0.5 + 0.05 * i))
        async for out in engine.generate(f"r{i}", valid):
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
            assert last.output.token_ids == tokens
        else:
            assert 3 <= len(tokens) < 12
    deadline = time.monotonic() + 5
    while engine.client.core.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)  # the aborts reach the core between steps
    core = engine.client.core
    assert core.scheduler.num_running == 0 and core.scheduler.kv_usage() == 0 and engine.health()["healthy"]
    engine.shutdown()


def test_bad_requests_raise_in_the_caller_and_harm_nobody():
    engine = make_async()
    with pytest.raises(ParamError, match="compute_budget"):
        engine.validate([1], SamplingParams(), ComputeParams(compute_budget=2.0))

    async def main():
        valid = engine.validate([1, 2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        return [o async for o in engine.generate("good", valid)]

    outs = asyncio.run(main())
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 4
    engine.shutdown()


def test_requests_arriving_during_a_step_wait_in_the_inbox_not_on_the_event_loop():
    """generate() and abort() never wait for a running step: requests that arrive during one are
    admitted together into the next."""
    engine = make_async(max_num_seqs=8)
    core = engine.client.core
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    in_step, release = threading.Event(), threading.Event()
    real_execute = core.executor.execute

    def slow_execute(scheduler_output):
        if scheduler_output.scheduled and not release.is_set():
            in_step.set()
            release.wait(timeout=5)
        return real_execute(scheduler_output)

    core.executor.execute = slow_execute

    async def main():
        first = engine.generate("first", engine.validate([9, 9], params))
        await asyncio.to_thread(in_step.wait, 5)
        started = time.monotonic()
        streams = [engine.generate(f"r{i}", engine.validate([1 + i, 2, 3], params)) for i in range(4)]
        engine.abort("r3")
        waited = time.monotonic() - started
        queued = core.scheduler.num_waiting
        release.set()
        assert waited < 0.5 and queued == 0  # nothing waited for the step; the core loop adds them
        return [[out async for out in s] for s in [first, *streams[:3]]]

    outs = asyncio.run(main())
    assert all(sum(len(o.new_token_ids) for o in seq) == 4 and seq[-1].finished for seq in outs)
    deadline = time.monotonic() + 5
    while core.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.scheduler.num_running == 0 and not core.has_unfinished()
    engine.shutdown()


def test_a_stream_nobody_reads_is_aborted_at_its_buffer_limit_and_frees_its_kv():
    engine = make_async(max_num_seqs=4)
    engine.max_buffered_outputs = 4
    core = engine.client.core
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def main():
        stuck = engine.generate("stuck", engine.validate([1, 2, 3], params))
        other = engine.generate("other", engine.validate([4, 5, 6], params))
        other_tokens = [t async for out in other for t in out.new_token_ids]  # read; never the stuck one
        deadline = time.monotonic() + 5
        while core.has_unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        unfinished = core.has_unfinished()
        got, error = [], None
        try:
            async for out in stuck:
                got += out.new_token_ids
        except Exception as e:
            error = e
        return other_tokens, unfinished, got, error

    other_tokens, unfinished, got, error = asyncio.run(main())
    assert len(other_tokens) == 40  # the stuck stream held nobody else up
    assert not unfinished and core.scheduler.kv_usage() == 0
    assert 4 <= len(got) < 40 and "unread" in str(error)
    engine.shutdown()
