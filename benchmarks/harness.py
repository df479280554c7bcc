"""What every benchmark shares: threads, prompts, engine runs, rounds, ratios, and the JSON and PNG.

A benchmark compares variants (budgets, backends, engines) on one machine that others share. So
each round runs every variant once, in an order rotated from round to round, and a comparison is
the median over rounds of the ratio within a round: a slow drift of the machine hits both sides
of a ratio alike and cancels out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from runtime.engine.engine import LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams

K = TypeVar("K")
R = TypeVar("R")

# The held-out novel: text the embedded model was not trained on. Relative to the repo root.
HELDOUT_TEXT = "training/data/austen/persuasion.txt"


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave torch's default) and return the count in use.
    On a shared machine use 1: a team of spinning threads stalls when one of them loses its core."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def csv_of(kind: type) -> Callable[[str], list]:
    """An argparse type for comma-separated values, e.g. `--batch-sizes 1,8,32`."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def make_prompts(tokenizer, vocab_size: int, count: int, length: int, prompt_file: str | None = None,
                 gen: torch.Generator | None = None) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids: consecutive windows of a text file, or (no file)
    random ids from `gen` (default: seeded 0, so every run and every benchmark sees the same ones)."""
    if prompt_file is None:
        gen = gen or torch.Generator().manual_seed(0)
        return [torch.randint(4, vocab_size, (length,), generator=gen).tolist() for _ in range(count)]
    path = Path(prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {prompt_file!r} does not exist (relative paths start at the "
                                "current directory; run from the repo root)")
    ids = tokenizer.encode(path.read_text(encoding="utf-8")).ids
    if len(ids) < count * length:
        raise ValueError(f"prompt file {prompt_file} has {len(ids)} tokens; {count} prompts of {length} "
                         f"need {count * length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


@dataclass
class EngineRun:
    """One batch of requests driven through an engine to the end."""

    tokens: list[list[int]]  # generated ids, per prompt in order
    depths: list[int]  # exit depth of every generated token
    itl: list[float]  # seconds between consecutive tokens of a request
    wall_s: float  # from the first add_request to the last output, prefill included
    decode: dict[str, float] = field(default_factory=dict)  # decode-only steps: tokens, seconds, steps, calls, fills

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode["tokens"] / max(self.decode["seconds"], 1e-9)


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int | list[int],
               compute: ComputeParams, sampling: list[SamplingParams] | None = None) -> EngineRun:
    """Greedy requests (ignore_eos, so each yields exactly its max_tokens) stepped until all finish;
    `sampling` replaces them, one per prompt (max_tokens is then theirs).

    A step counts as decode when every unfinished request already had its first token before it,
    that is, when the step runs no prompt. Its batched core calls and fill-only calls come from
    the executor's counters."""
    counts = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    tag = time.monotonic_ns()  # ids unique across runs on one engine
    ids = [f"bench-{tag}-{i}" for i in range(len(prompts))]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    last: dict[str, float] = {}
    itl: list[float] = []
    depths: list[int] = []
    decode = {"tokens": 0, "seconds": 0.0, "steps": 0, "calls": 0, "fills": 0}
    executor = engine.executor
    start = time.perf_counter()
    sampling = sampling or [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in counts]
    for rid, p, params in zip(ids, prompts, sampling, strict=True):
        engine.add_request(rid, p, params, compute)
    unfinished = set(ids)
    while unfinished:
        all_decode = all(tokens[i] for i in unfinished)
        calls, fills = executor.num_batched_calls, executor.num_fill_calls
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if all_decode:
            decode["tokens"] += sum(len(o.new_token_ids) for o in outs)
            decode["seconds"] += now - t0
            decode["steps"] += 1
            decode["calls"] += executor.num_batched_calls - calls
            decode["fills"] += executor.num_fill_calls - fills
        for o in outs:
            if o.new_token_ids:
                if o.request_id in last:
                    itl.append(now - last[o.request_id])
                last[o.request_id] = now
                tokens[o.request_id] += o.new_token_ids
                depths += o.exit_depths
            if o.finished:
                unfinished.discard(o.request_id)
    return EngineRun([tokens[i] for i in ids], depths, itl, time.perf_counter() - start, decode)


def rotated(items: Sequence[K], r: int) -> list[K]:
    """`items` rotated left by r: round r's order, so no variant always runs first."""
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def run_rounds(variants: Sequence[K], rounds: int, once: Callable[[K], R],
               label: str | None = None) -> list[dict[K, R]]:
    """`rounds` rounds of `once(variant)` for every variant in rotated order. One dict per round,
    keyed in the order the variants ran. With a label, a line after each round shows progress."""
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    results = []
    for r in range(rounds):
        results.append({v: once(v) for v in rotated(variants, r)})
        if label is not None:
            print(f"  {label}: round {r + 1}/{rounds} done", flush=True)
    return results


def round_ratios(rounds: list[dict[K, R]], num: K, den: K, figure: Callable[[R], float]) -> list[float]:
    """figure(num) / figure(den) within each round."""
    return [figure(r[num]) / figure(r[den]) for r in rounds]


def median_ratio(rounds: list[dict[K, R]], num: K, den: K, figure: Callable[[R], float]) -> float:
    return statistics.median(round_ratios(rounds, num, den, figure))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (q in [0, 1]); nan for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def pyplot():
    """matplotlib's pyplot on the file-only backend (benchmarks run on machines with no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_results(out: str | Path, result: dict[str, Any], plot: Callable[[Path], None] | None = None) -> Path:
    """`result` as JSON at `out` and, given a plot, the figure beside it as PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if plot is None:
        print(f"wrote {out}")
    else:
        plot(out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return out


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
