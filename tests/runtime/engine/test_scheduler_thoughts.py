"""Thought KV discard in the scheduler, with runner outputs built by hand (no model): whole blocks
come back after every thought, chunks carry the right tokens and RoPE offsets, replays re-drop."""

from runtime.engine.outputs import ModelRunnerOutput, Sampled
from runtime.engine.params import SamplingParams
from runtime.engine.request import Request
from runtime.engine.scheduler import Scheduler, SchedulerConfig

THINK, END = 100, 101


def step(sched: Scheduler, token_for: dict[str, int] | None = None, default: int = 7):
    out = sched.schedule()
    sampled = {c.request_id: Sampled((token_for or {}).get(c.request_id, default), 0.0) for c in out.scheduled
               if c.samples}
    sched.update_from_output(out, ModelRunnerOutput(sampled=sampled, depths={c.request_id: [1] * len(c.token_ids)
                                                                              for c in out.scheduled}))
    return out


def think(sched: Scheduler, rid: str, n_thoughts: int) -> tuple[int, int]:
    """Sample <think>, n thoughts and </think> for request rid; register the span. Returns it."""
    req = sched.get_request(rid)
    step(sched, {rid: THINK})
    start = req.num_tokens - 1
    for _ in range(n_thoughts):
        step(sched, {rid: 5})
    step(sched, {rid: END})
    end = req.num_tokens - 1
    sched.discard_thought(rid, start, end)
    return start, end


def test_every_thought_returns_whole_blocks_and_later_chunks_keep_their_positions():
    sched = Scheduler(SchedulerConfig(num_kv_blocks=32, max_model_len=128, block_size=4, max_num_batched_tokens=64,
                                      max_num_seqs=4))
    sched.add_request(Request("a", list(range(6)), SamplingParams(max_tokens=60)))
    step(sched)  # prefill; samples token 6
    req = sched.get_request("a")
    for n_thoughts in (9, 13):  # two thoughts in one request
        cached_before = req.num_computed_tokens + 1  # the last sampled token is computed next step
        start, end = think(sched, "a", n_thoughts)
        blocks_during = len(req.block_table)
        out = step(sched)  # computes </think>, samples the first visible token
        assert not out.kv_moves  # the token after </think> is not known yet
        out = step(sched)  # drops the span, then computes the first visible token
        (src, dst), = out.kv_moves  # </think> moves down over <think>
        chunk = out.scheduled[0]
        assert chunk.position_offset == req.num_discarded and chunk.start_position == cached_before + 1
        assert chunk.token_ids == [req.all_token_ids[end + 1]]  # the first visible token, at its RoPE position
        assert chunk.start_position + chunk.position_offset == end + 1
        assert dst == req.block_table[cached_before // 4] * 4 + cached_before % 4
        assert len(req.block_table) == -(-(cached_before + 2) // 4) < blocks_during  # whole blocks came back
        for _ in range(3):
            step(sched)
    assert req.num_discarded == (9 + 1) + (13 + 1)
    assert sched.allocator.num_used == len(req.block_table) == -(-req.num_computed_tokens // 4)
    sched.abort("a")
    assert sched.allocator.num_used == 0


def test_a_preempted_request_replays_up_to_each_think_end_before_dropping_it():
    sched = Scheduler(SchedulerConfig(num_kv_blocks=64, max_model_len=128, block_size=4, max_num_batched_tokens=64,
                                      max_num_seqs=4))
    sched.add_request(Request("a", list(range(5)), SamplingParams(max_tokens=60)))
    step(sched)
    req = sched.get_request("a")
    start, end = think(sched, "a", 6)
    for _ in range(4):
        step(sched)
    live = (req.num_computed_tokens, req.num_discarded, list(req.all_token_ids))
    sched._preempt(req)
    out = step(sched)  # replay: prefill stops right after </think>, nothing later sees the span
    assert out.scheduled[0].token_ids == req.all_token_ids[: end + 1] and not out.scheduled[0].samples
    out = step(sched)  # drop it again, then the rest of the prefill at the shifted positions
    (src, dst), = out.kv_moves
    chunk = out.scheduled[0]
    assert chunk.start_position == start + 1 and chunk.position_offset == end - start and chunk.samples
    assert chunk.token_ids == live[2][end + 1 :]
    assert (req.num_computed_tokens - 1, req.num_discarded) == live[:2]  # one more token computed since
