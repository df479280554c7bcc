"""Quality at a compute budget, through the API only: teacher-forced next-token accuracy on held-out text.

The API has no prompt logprobs (no `echo`), so exact perplexity cannot be read off it. Instead each
sample is a window of the held-out text: the server gets the first `context` tokens as a token-id
prompt and generates one greedy token with `logprobs=5` at the budget under test. The sample is a
top-1 hit when that token is the text's real next token, and a top-5 hit when the real token is
among the five returned. Both are exact measurements (not bounds), and they compare budgets on the
same windows. Token strings are matched through the server's own /detokenize, so any model works.
"""

from __future__ import annotations

import asyncio
import math

from tqdm import tqdm

from loadtests.client import Client


async def tokenize(client: Client, text: str) -> list[int]:
    return (await client.post_json("/tokenize", {"model": client.model, "prompt": text}))["tokens"]


async def detokenize(client: Client, ids: list[int]) -> str:
    return (await client.post_json("/detokenize", {"model": client.model, "tokens": ids}))["prompt"]


async def make_windows(client: Client, text: str, num: int, context: int) -> list[tuple[list[int], str]]:
    """`num` (context ids, next-token string) pairs at evenly spaced offsets of the tokenized `text`."""
    ids = await tokenize(client, text)
    if len(ids) < num + context:
        raise ValueError(f"the quality text has {len(ids)} tokens, too few for {num} windows of {context}; "
                         "lower --quality-samples or --quality-context")
    stride = (len(ids) - context - 1) // num
    starts = [i * stride for i in range(num)]
    targets = await asyncio.gather(*(detokenize(client, [ids[s + context]]) for s in starts))
    return [(ids[s:s + context], t) for s, t in zip(starts, targets)]


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a hit rate."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


async def score(client: Client, windows: list[tuple[list[int], str]], extra: dict, batch: int = 16,
                desc: str = "quality") -> dict:
    """Top-1 and top-5 next-token accuracy of the windows at the compute parameters in `extra`."""
    top1 = top5 = 0
    depths: list[int] = []
    for i in tqdm(range(0, len(windows), batch), desc=desc, leave=False):
        chunk = windows[i:i + batch]
        body = {"model": client.model, "prompt": [w for w, _ in chunk], "max_tokens": 1, "temperature": 0.0,
                "logprobs": 5, **extra}
        data = await client.post_json("/v1/completions", body)
        for choice in sorted(data["choices"], key=lambda c: c["index"]):
            target = chunk[choice["index"]][1]
            lp = choice["logprobs"]
            top1 += lp["tokens"][0] == target
            top5 += target in lp["top_logprobs"][0]
            depths += lp.get("exit_depths") or []
    n = len(windows)
    return {"num_samples": n, "top1_accuracy": top1 / n, "top1_accuracy_ci95": wilson(top1, n),
            "top5_accuracy": top5 / n, "top5_accuracy_ci95": wilson(top5, n),
            "scored_token_mean_depth": sum(depths) / len(depths) if depths else None}
