"""`ponder bench`: the engine benchmark (benchmarks/engine.py). The other benchmarks run as
`python -m benchmarks.NAME`; each module's docstring gives its command."""

from __future__ import annotations

import argparse

from benchmarks.engine import run_bench
from benchmarks.harness import csv_of, set_threads
from runtime.checkpoint import DEFAULT_MODEL


def add_parsers(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmark engine decode speed at compute budgets and batch sizes")
    b.add_argument("--model", default=str(DEFAULT_MODEL))
    b.add_argument("--batch-sizes", type=csv_of(int), default="1,8,32")
    b.add_argument("--budgets", type=csv_of(float), default="1.0,0.75,0.5,0.25")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--out", default="results/bench.json")
    b.add_argument("--prompt-file", help="take prompts from this text file (default: random token ids)")
    b.add_argument("--threads", type=int, help="torch threads (use 1 on a shared machine)")
    b.add_argument("--rounds", type=int, default=3, help="rounds per batch size; the table shows medians")
    b.set_defaults(func=run_from_args)


def run_from_args(a: argparse.Namespace) -> None:
    set_threads(a.threads)
    run_bench(a.model, a.batch_sizes, a.budgets, a.prompt_len, a.max_tokens, a.device, a.dtype, a.out,
              a.prompt_file, a.rounds)
