"""`ponder generate`: complete a prompt with a checkpoint at a compute budget."""

from __future__ import annotations

import argparse
import time

from runtime.checkpoint import DEFAULT_MODEL


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="complete prompts with a checkpoint at a compute budget")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the embedded model)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable); default: a line of Austen")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--compute-budget", type=float, default=1.0, help="target mean core depth fraction, in (0, 1]")
    g.add_argument("--exit-price", type=float, help="raw exit price; overrides --compute-budget")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    g.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from runtime.checkpoint import load_checkpoint
    from runtime.devices import resolve_device, resolve_dtype
    from runtime.generate import generate
    from runtime.model import ExitSpec

    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens {args.max_tokens} must be > 0")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature} must be >= 0")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    price = args.exit_price if args.exit_price is not None else ckpt.calibration.price_for_budget(args.compute_budget)
    prompts = args.prompt or ["It is a truth universally acknowledged, that"]
    max_depth = ckpt.config.max_depth
    stop = tuple(i for i in (ckpt.config.eos_id,) if i is not None)
    for prompt in prompts:
        start = time.perf_counter()
        gen = generate(ckpt.model, ckpt.tokenizer.encode(prompt).ids, args.max_tokens, ExitSpec(price=price),
                       args.temperature, args.top_k, args.seed, stop)
        elapsed = time.perf_counter() - start
        mean_depth = sum(gen.exit_depths) / max(len(gen.exit_depths), 1)
        print(f"{prompt}{ckpt.tokenizer.decode(gen.token_ids)}")
        print(f"  [{len(gen.token_ids)} tokens, {len(gen.token_ids) / elapsed:.1f} tok/s, mean depth "
              f"{mean_depth:.2f}/{max_depth} (saved {1 - mean_depth / max(max_depth, 1):.0%}), price {price:.4g}, "
              f"finish={gen.finish_reason}]")
