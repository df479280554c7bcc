"""A step with nothing to schedule closes itself, so the engine keeps working.

The race the server fuzz run found: AsyncEngine checks has_unfinished(), a client disconnect aborts
the last request, then step() runs on an empty scheduler. It used to leave the scheduler's step open,
and every later step raised "schedule() called twice": the engine was wedged for good.
"""

from runtime.engine.params import SamplingParams
from tests.runtime.engine.test_engine import drain, make_engine


def test_a_step_after_the_last_request_was_aborted_leaves_the_engine_working():
    engine = make_engine()
    engine.add_request("gone", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert engine.has_unfinished()
    engine.abort("gone")  # between the loop's has_unfinished() check and its step()
    assert engine.step() == [] and engine.step() == []
    engine.add_request("next", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    results = drain(engine)
    assert results["next"]["finish"] == "length" and len(results["next"]["tokens"]) == 4
