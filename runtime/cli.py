"""`ponder generate`."""

from __future__ import annotations

import argparse
import time

from runtime.checkpoint import DEFAULT_MODEL


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="complete prompts with a checkpoint at a compute budget (batched engine)")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the embedded model)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable); default: a line of Austen")
    g.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--compute-budget", type=float, default=1.0, help="target mean core depth fraction, in (0, 1]")
    g.add_argument("--exit-price", type=float, help="raw exit price; overrides --compute-budget")
    g.add_argument("--min-depth", type=int)
    g.add_argument("--max-depth", type=int)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    g.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 where this CPU or GPU runs it natively, else float32) | float32 | bfloat16 | float16")
    g.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from runtime.engine.llm import LLM
    from runtime.engine.params import ComputeParams, SamplingParams

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, n=args.n)
    compute = ComputeParams(compute_budget=args.compute_budget, exit_price=args.exit_price,
                            min_depth=args.min_depth, max_depth=args.max_depth)
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    prompts = args.prompt or ["It is a truth universally acknowledged, that"]
    if args.chat:
        from runtime.chat_template import apply_chat_template

        prompts = [apply_chat_template([{"role": "user", "content": p}], llm.engine.ckpt.chat_template) for p in prompts]
    start = time.perf_counter()
    completions = llm.generate(prompts, sampling, compute, use_tqdm=False)
    elapsed = time.perf_counter() - start
    max_depth = llm.engine.ckpt.config.max_depth
    total = sum(len(o.token_ids) for c in completions for o in c.outputs)
    for c in completions:
        for o in c.outputs:
            depth = sum(o.exit_depths) / max(len(o.exit_depths), 1)
            print(f"{c.prompt}{o.text}")
            print(f"  [{len(o.token_ids)} tokens, mean exit depth {depth:.2f}/{max_depth} "
                  f"(saved {1 - depth / max(max_depth, 1):.0%}), finish={o.finish_reason}]")
    print(f"{total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tok/s)")
