"""Scheduler tests: runner outputs are built by hand; no torch, no model."""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.config import ConfigError
from runtime.engine.kv_blocks import BlockAllocator, NoFreeBlocks, cdiv
from runtime.engine.outputs import FinishReason, ModelRunnerOutput, Sampled
from runtime.engine.params import SamplingParams
from runtime.engine.request import Request, RequestStatus
from runtime.engine.scheduler import OverloadedError, Scheduler, SchedulerConfig, SchedulerOutput

REPO = Path(__file__).resolve().parents[3]


def make_sched(**overrides) -> Scheduler:
    fields = dict(
        num_kv_blocks=64,
        max_model_len=256,
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        long_prefill_token_threshold=64,
    )
    fields.update(overrides)
    return Scheduler(SchedulerConfig(**fields))


def make_req(rid: str, num_prompt: int, max_tokens: int, arrival: float = 0.0) -> Request:
    return Request(rid, list(range(100, 100 + num_prompt)), SamplingParams(max_tokens=max_tokens), arrival=arrival)


def runner_output(sched: SchedulerOutput, sampled: dict[str, int], failed: dict[str, str] | None = None):
    """What an executor returns: the sampled tokens, and depth 1 at every position run."""
    failed = failed or {}
    depths = {c.request_id: [1] * len(c.token_ids) for c in sched.scheduled if c.request_id not in failed}
    return ModelRunnerOutput(sampled={rid: Sampled(t, 0.0) for rid, t in sampled.items()}, depths=depths, failed=failed)


def next_token(req: Request) -> int:
    """The fake model's sample: output i is always 1000 + i, so recompute must reproduce it."""
    return 1000 + len(req.output_token_ids)


def run_output(sched: Scheduler, out: SchedulerOutput, failed: dict[str, str] | None = None) -> ModelRunnerOutput:
    failed = failed or {}
    sampled = {
        c.request_id: next_token(sched.get_request(c.request_id))
        for c in out.scheduled
        if c.samples and c.request_id not in failed and sched.get_request(c.request_id) is not None
    }
    return runner_output(out, sampled, failed)


def step(sched: Scheduler, failed: dict[str, str] | None = None):
    out = sched.schedule()
    updates = sched.update_from_output(out, run_output(sched, out, failed))
    return out, updates


def ids(out: SchedulerOutput) -> list[str]:
    return [c.request_id for c in out.scheduled]


# ---------------------------------------------------------------------------- building blocks


def test_block_allocator():
    alloc = BlockAllocator(num_blocks=4, block_size=16)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_used == 3 and alloc.num_free == 1 and alloc.usage == 0.75
    with pytest.raises(NoFreeBlocks, match="asked for 2"):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocate takes nothing
    alloc.free(a[:1])
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(a[:1])
    alloc.free(a[1:])
    assert alloc.num_free == 4 and alloc.usage == 0.0
    assert alloc.num_blocks_for(0) == 0 and alloc.num_blocks_for(16) == 1 and alloc.num_blocks_for(17) == 2


def test_request_properties():
    r = Request("r", [1, 2, 3], SamplingParams(max_tokens=2), output_token_ids=[7])
    assert r.all_token_ids == [1, 2, 3, 7] and r.num_tokens == 4 and not r.is_finished and r.max_tokens == 2
    assert RequestStatus.FINISHED_LENGTH.finish_reason is FinishReason.LENGTH and RequestStatus.RUNNING.finish_reason is None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_kv_blocks=0), "num_kv_blocks=0"),
        (dict(block_size=-1), "block_size=-1"),
        (dict(max_waiting=-1), "max_waiting=-1"),
        (dict(long_prefill_token_threshold=0), "long_prefill_token_threshold=0"),
        (dict(max_num_seqs=32, max_num_batched_tokens=16), "raise max_num_batched_tokens"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig(**{"num_kv_blocks": 8, "max_model_len": 64, **fields})


# ---------------------------------------------------------------------------- single request


def test_single_request_prefill_then_decodes_to_max_tokens():
    sched = make_sched()
    sched.add_request(make_req("a", num_prompt=5, max_tokens=4))
    assert sched.num_waiting == 1 and sched.has_unfinished()

    out, updates = step(sched)
    [chunk] = out.scheduled
    assert chunk.token_ids == list(range(100, 105)) and chunk.start_position == 0 and chunk.samples
    assert len(chunk.block_table) == 2 and out.num_batched_tokens == 5
    assert [(u.request_id, u.new_token_ids, u.finished) for u in updates] == [("a", [1000], False)]
    assert sched.num_running == 1 and sched.num_waiting == 0

    for i, position in enumerate([5, 6, 7]):
        out, updates = step(sched)
        [chunk] = out.scheduled
        assert chunk.token_ids == [1000 + i] and chunk.start_position == position and chunk.samples
        assert len(chunk.block_table) == cdiv(position + 1, 4)
        assert updates[0].new_token_ids == [1001 + i]
    assert updates[0].finished and updates[0].finish_reason is FinishReason.LENGTH
    assert sched.allocator.num_free == 64 and not sched.has_unfinished() and sched.kv_usage() == 0.0

    out = sched.schedule()
    assert out.scheduled == [] and out.finished_ids == ["a"]
    assert sched.update_from_output(out, ModelRunnerOutput()) == []


def test_caller_finishes_on_stop_token():
    sched = make_sched()
    sched.add_request(make_req("a", num_prompt=3, max_tokens=10))
    step(sched)
    assert sched.finish("a") is True
    assert sched.allocator.num_free == 64 and sched.num_running == 0
    assert sched.finish("a") is False
    assert sched.schedule().finished_ids == ["a"]
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish("b", RequestStatus.RUNNING)


# ---------------------------------------------------------------------------- chunked prefill and budget


def test_chunked_prefill_across_iterations_samples_once():
    sched = make_sched(max_num_seqs=4, max_num_batched_tokens=16)
    req = make_req("a", num_prompt=50, max_tokens=2)
    sched.add_request(req)
    chunks = []
    for _ in range(4):
        out, updates = step(sched)
        [chunk] = out.scheduled
        chunks.append(chunk)
        assert bool(updates) == chunk.samples
    assert [len(c.token_ids) for c in chunks] == [16, 16, 16, 2]
    assert [c.start_position for c in chunks] == [0, 16, 32, 48]
    assert [c.samples for c in chunks] == [False, False, False, True]
    assert sum((c.token_ids for c in chunks), []) == req.prompt_token_ids
    for prev, cur in zip(chunks, chunks[1:]):
        assert cur.block_table[: len(prev.block_table)] == prev.block_table  # tables only grow
    for c in chunks:
        assert len(c.block_table) == cdiv(c.start_position + len(c.token_ids), 4)
    assert req.output_token_ids == [1000] and req.num_computed_tokens == 50

    out, updates = step(sched)
    assert out.scheduled[0].token_ids == [1000] and out.scheduled[0].start_position == 50
    assert updates[0].finished and sched.allocator.num_free == 64


def test_long_prefill_threshold_caps_chunks():
    sched = make_sched(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    sched.add_request(make_req("a", num_prompt=20, max_tokens=1))
    sizes = [len(step(sched)[0].scheduled[0].token_ids) for _ in range(3)]
    assert sizes == [8, 8, 4] and not sched.has_unfinished()


def test_decodes_run_first_and_share_budget_with_a_prefill():
    sched = make_sched(max_num_seqs=4, max_num_batched_tokens=16)
    sched.add_request(make_req("a", num_prompt=4, max_tokens=8))
    step(sched)
    sched.add_request(make_req("b", num_prompt=40, max_tokens=1))
    out, _ = step(sched)
    assert ids(out) == ["a", "b"]
    assert [len(c.token_ids) for c in out.scheduled] == [1, 15] and out.num_batched_tokens == 16
    assert not out.scheduled[1].samples


def test_token_budget_and_max_num_seqs_respected():
    sched = make_sched(max_num_seqs=3, max_num_batched_tokens=16)
    for i in range(10):
        sched.add_request(make_req(f"r{i}", num_prompt=7, max_tokens=3, arrival=i))
    out, _ = step(sched)
    assert ids(out) == ["r0", "r1", "r2"] and [len(c.token_ids) for c in out.scheduled] == [7, 7, 2]
    num_steps = 1
    while sched.has_unfinished():
        out, _ = step(sched)
        assert out.num_batched_tokens <= 16 and len(out.scheduled) <= 3 and sched.num_running <= 3
        num_steps += 1
        assert num_steps < 100
    assert sched.allocator.num_free == 64


def test_fcfs_admission_does_not_skip_the_head():
    sched = make_sched(num_kv_blocks=4, max_model_len=16)
    a, b, c = make_req("a", 12, 4), make_req("b", 8, 2), make_req("c", 2, 2)
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = step(sched)
    assert ids(out) == ["a"]  # b needs 2 blocks, 1 is free; c would fit but must not jump the queue
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    while a.status is RequestStatus.RUNNING:
        out, _ = step(sched)
        assert ids(out) == ["a"]
    out, _ = step(sched)
    assert ids(out) == ["b", "c"]


# ---------------------------------------------------------------------------- preemption


def test_preemption_by_recompute_and_resume():
    sched = make_sched(num_kv_blocks=4, max_model_len=16)
    a, b = make_req("a", 4, 8, arrival=0.0), make_req("b", 4, 8, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(5):  # positions 0..7 of each: two blocks apiece fill the pool
        out, _ = step(sched)
        assert ids(out) == ["a", "b"] and out.preempted_ids == []
    assert sched.allocator.num_free == 0 and len(b.output_token_ids) == 5

    out, _ = step(sched)  # a needs a third block: b, the later arrival, is evicted
    assert ids(out) == ["a"] and out.preempted_ids == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.output_token_ids == list(range(1000, 1005))
    assert sched.waiting[0] is b and sched.num_running == 1

    while a.status is RequestStatus.RUNNING:
        out, _ = step(sched)
        assert ids(out) == ["a"]
    assert a.status is RequestStatus.FINISHED_LENGTH and a.output_token_ids == list(range(1000, 1008))

    out, updates = step(sched)  # b recomputes prompt + its outputs, then samples its 6th token
    [chunk] = out.scheduled
    assert chunk.request_id == "b" and chunk.start_position == 0 and chunk.samples
    assert chunk.token_ids == b.prompt_token_ids + list(range(1000, 1005))
    assert updates[0].new_token_ids == [1005]
    while sched.has_unfinished():
        step(sched)
    assert b.status is RequestStatus.FINISHED_LENGTH and b.output_token_ids == list(range(1000, 1008))
    assert sched.allocator.num_free == 4


def test_latest_request_preempts_itself():
    sched = make_sched(num_kv_blocks=3, max_model_len=12)
    a, b = make_req("a", 2, 3, arrival=0.0), make_req("b", 7, 4, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    step(sched)
    out, _ = step(sched)  # b needs a third block and is itself the latest arrival
    assert ids(out) == ["a"] and out.preempted_ids == ["b"] and b.status is RequestStatus.PREEMPTED
    assert a.status is RequestStatus.FINISHED_LENGTH
    out, _ = step(sched)
    assert out.scheduled[0].token_ids == b.prompt_token_ids + [1000, 1001]
    step(sched)
    assert b.status is RequestStatus.FINISHED_LENGTH and b.output_token_ids == [1000, 1001, 1002, 1003]
    assert sched.allocator.num_free == 3


# ---------------------------------------------------------------------------- abort, failure, refusal


def test_abort_waiting_and_running():
    sched = make_sched(max_num_seqs=1)
    sched.add_request(make_req("a", 5, 10))
    sched.add_request(make_req("b", 5, 10))
    sched.add_request(make_req("c", 5, 10))
    assert sched.abort("b") is True and sched.num_waiting == 2
    out, _ = step(sched)
    assert ids(out) == ["a"] and out.finished_ids == ["b"]
    assert sched.allocator.num_used == 2

    assert sched.abort("a") is True
    assert sched.allocator.num_used == 0 and sched.num_running == 0
    assert sched.abort("a") is False and sched.abort("nope") is False
    out, _ = step(sched)
    assert ids(out) == ["c"] and out.finished_ids == ["a"]


def test_abort_between_schedule_and_update():
    sched = make_sched()
    sched.add_request(make_req("a", 5, 10))
    sched.add_request(make_req("b", 5, 10))
    out = sched.schedule()
    runner_out = run_output(sched, out)
    sched.abort("a")
    updates = sched.update_from_output(out, runner_out)  # the executor already ran a; its token is dropped
    assert [u.request_id for u in updates] == ["b"]
    assert sched.allocator.num_used == 2 and sched.num_running == 1


def test_failed_requests_finish_with_error_and_free_blocks():
    sched = make_sched(max_num_batched_tokens=16, long_prefill_token_threshold=8)
    sched.add_request(make_req("a", 3, 10))
    sched.add_request(make_req("b", 20, 10))  # still in chunked prefill when it fails
    out, updates = step(sched, failed={"b": "CUDA error: out of memory"})
    assert not out.scheduled[1].samples
    assert [(u.request_id, u.finished, u.finish_reason, u.error) for u in updates] == [
        ("a", False, None, None),
        ("b", True, FinishReason.ERROR, "CUDA error: out of memory"),
    ]
    assert sched.allocator.num_used == 1 and sched.get_request("b") is None
    _, updates = step(sched, failed={"a": "boom"})
    assert updates[0].finish_reason is FinishReason.ERROR and sched.allocator.num_used == 0


def test_overloaded_past_the_free_slots_plus_max_waiting():
    sched = make_sched(max_num_seqs=2, max_waiting=1)
    for rid in "abc":  # two take the free slots, one waits
        sched.add_request(make_req(rid, 3, 3))
    with pytest.raises(OverloadedError, match="max_waiting=1"):
        sched.add_request(make_req("d", 3, 3))
    step(sched)  # a and b run, c still waits: the queue is full
    with pytest.raises(OverloadedError):
        sched.add_request(make_req("d", 3, 3))
    for _ in range(3):
        step(sched)  # a and b finish (max_tokens 3): their slots free up
    sched.add_request(make_req("d", 3, 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_req("d", 3, 3))

    no_queue = make_sched(max_num_seqs=2, max_waiting=0)  # only into a free slot
    no_queue.add_request(make_req("a", 3, 3))
    no_queue.add_request(make_req("b", 3, 3))
    with pytest.raises(OverloadedError, match="max_waiting=0"):
        no_queue.add_request(make_req("c", 3, 3))


def test_executor_contract_errors():
    sched = make_sched()
    with pytest.raises(RuntimeError, match="last schedule"):
        sched.update_from_output(SchedulerOutput(), ModelRunnerOutput())
    sched.add_request(make_req("a", 3, 3))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="twice"):
        sched.schedule()
    with pytest.raises(ValueError, match="do not match the schedule"):
        sched.update_from_output(out, ModelRunnerOutput())
    assert sched.update_from_output(out, runner_output(out, {"a": 5}))[0].new_token_ids == [5]


# ---------------------------------------------------------------------------- randomized invariants


def check_invariants(sched: Scheduler) -> None:
    cfg = sched.config
    live = list(sched.running) + list(sched.waiting)
    assert {r.request_id for r in live} == set(sched.requests) and len(live) == len(sched.requests)
    assert sched.num_running <= cfg.max_num_seqs
    owned = [b for r in sched.running for b in r.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert len(owned) == sched.allocator.num_used
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert len(r.block_table) == cdiv(r.num_computed_tokens, cfg.block_size)  # covers, and no more
        assert 0 < r.num_tokens - r.num_computed_tokens
        assert len(r.output_token_ids) < r.max_tokens
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.block_table == [] and r.num_computed_tokens == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_invariants(seed):
    rng = random.Random(seed)
    cfg = SchedulerConfig(
        num_kv_blocks=10,
        block_size=4,
        max_model_len=40,
        max_num_seqs=4,
        max_num_batched_tokens=12,
        long_prefill_token_threshold=8,
        max_waiting=6,
    )
    sched = Scheduler(cfg)
    everyone: dict[str, Request] = {}
    num_refused = 0
    for i in range(3000):
        arriving = i < 300
        for _ in range(rng.choice([0, 0, 1, 2]) if arriving else 0):
            req = Request(f"r{len(everyone)}", [rng.randrange(50) for _ in range(rng.randint(1, 24))],
                          SamplingParams(max_tokens=rng.randint(1, 16)), arrival=float(i))
            try:
                sched.add_request(req)
                everyone[req.request_id] = req
            except OverloadedError:
                num_refused += 1
        if arriving and sched.requests and rng.random() < 0.05:
            sched.abort(rng.choice(sorted(sched.requests)))

        out = sched.schedule()
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens and len(out.scheduled) <= cfg.max_num_seqs
        assert not set(out.preempted_ids) & set(ids(out))
        for c in out.scheduled:
            r = everyone[c.request_id]
            end = c.start_position + len(c.token_ids)
            assert c.start_position == r.num_computed_tokens and c.token_ids == r.all_token_ids[c.start_position:end]
            assert c.block_table == r.block_table and len(c.block_table) == cdiv(end, cfg.block_size)
            assert c.samples == (end == r.num_tokens)
        failed = {c.request_id: "injected" for c in out.scheduled if rng.random() < 0.02}
        runner_out = run_output(sched, out, failed)
        if arriving and sched.requests and rng.random() < 0.03:
            sched.abort(rng.choice(sorted(sched.requests)))
        for u in sched.update_from_output(out, runner_out):
            if not u.finished and rng.random() < 0.03:
                sched.finish(u.request_id)
        check_invariants(sched)
        if not arriving and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), "the scheduler did not drain"
    assert sched.allocator.num_free == cfg.num_kv_blocks

    statuses = [r.status for r in everyone.values()]
    assert all(s.is_finished for s in statuses)
    assert statuses.count(RequestStatus.FINISHED_LENGTH) > 10 and num_refused > 0
    assert sum(r.num_preemptions for r in everyone.values()) > 0, "the pool was too big to force preemption"
    for r in everyone.values():
        assert r.output_token_ids == list(range(1000, 1000 + len(r.output_token_ids)))
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert len(r.output_token_ids) == r.max_tokens


def test_scheduler_does_not_import_torch():
    code = "import sys, runtime.engine.scheduler; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
