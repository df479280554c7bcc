"""/metrics during thought KV discard: KV usage falls once a thought is dropped, and thought
tokens are counted. The engine is stepped by hand, so each scrape sees a known moment."""

from prometheus_client.parser import text_string_to_metric_families

from runtime.engine.params import ComputeParams, SamplingParams
from server.metrics import ServerMetrics
from tests.runtime.engine.test_thoughts import END, THINK, make_engine


def scrape(metrics: ServerMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_kv_usage_in_metrics_falls_when_a_thought_is_discarded():
    engine = make_engine(block_size=4, num_kv_blocks=16, max_num_seqs=2)
    stats = lambda: {"num_running": engine.scheduler.num_running, "num_waiting": engine.scheduler.num_waiting,  # noqa: E731
                     "kv_cache_usage": engine.kv_usage(), "core_steps": engine.num_core_steps,
                     "core_steps_full": engine.num_core_steps_full, "block_steps": list(engine.block_steps)}
    metrics = ServerMetrics("m", 2, stats)
    engine.add_request("r", [1, 2, THINK], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                       ComputeParams(max_thought_tokens=12, thought_kv="discard"))
    usage, tokens = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            if out.num_new_thought_tokens:
                metrics.thought_tokens.labels("m").inc(out.num_new_thought_tokens)
        usage.append(scrape(metrics)["ponder:kv_cache_usage_perc"])
    end = tokens.index(END)
    peak = max(usage[: end + 2])
    assert usage[end + 2] < peak  # the step after the first visible token: the span's blocks are free
    assert usage[end + 2] == 1 / 16  # prompt + </think> + one answer token fit one block of 4
    assert usage[-1] == 0.0
    assert scrape(metrics)["ponder:thought_tokens_total"] == end == 12
