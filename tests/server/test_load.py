"""64 concurrent streaming requests with mixed budgets, 10 of whose clients disconnect early:
all complete without error, and afterwards every KV block is free and nothing is running."""

import asyncio
import re
import urllib.request

import openai


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M).group(1))


def test_concurrent_streams_with_disconnects_leave_nothing_behind(server):
    base, _ = server
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> tuple[int, str | None]:
        stream = await client.completions.create(
            model="austen-small", prompt=f"Chapter {i}. Anne", max_tokens=24, temperature=0.7, seed=i, stream=True,
            extra_body={"compute_budget": (0.25, 0.5, 0.75, 1.0)[i % 4], "ignore_eos": True})
        n, finish = 0, None
        async for chunk in stream:
            n += 1
            finish = chunk.choices[0].finish_reason or finish
            if i < 10 and n == 3:
                await stream.close()  # the client goes away mid-stream
                break
        return n, finish

    async def main():
        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(main())
    assert all(n == 3 for n, _ in results[:10])
    assert all(finish == "length" for _, finish in results[10:])
    for _ in range(50):  # aborts land within an engine step or two
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        if metric(text, "ponder:num_requests_running") == 0 and metric(text, "ponder:kv_cache_usage_perc") == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metric(text, "ponder:num_requests_running") == 0
    assert metric(text, "ponder:num_requests_waiting") == 0
    assert metric(text, "ponder:kv_cache_usage_perc") == 0
    finished = {m.group(1): float(m.group(2)) for m in
                re.finditer(r'^ponder:request_success_total{finished_reason="(\w+)",[^}]*} (\S+)$', text, re.M)}
    assert finished.get("length", 0) >= 54 and finished.get("abort", 0) <= 10
