"""Greedy chat completions at several compute budgets, side by side (Markdown + JSON).

    python -m benchmarks.side_by_side --model checkpoints/smollm2-135m-exits --budgets 1.0,0.8,0.6 --out results/smollm2-generations
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.harness import csv_of, write_results
from runtime.chat_template import apply_chat_template
from runtime.engine.llm import LLM
from runtime.engine.params import ComputeParams, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for sleeping better.",
    "Explain what a prime number is in one sentence.",
    "Who wrote Pride and Prejudice?",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--budgets", type=csv_of(float), default=[1.0, 0.8, 0.6])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default="results/generations")
    args = p.parse_args()
    if not all(0 < b <= 1 for b in args.budgets) or args.max_tokens < 1:
        p.error("--budgets must be in (0, 1], --max-tokens >= 1")
    llm = LLM(args.model)
    ckpt = llm.engine.ckpt
    prompts = [apply_chat_template([{"role": "user", "content": q}], ckpt.chat_template) for q in PROMPTS]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    rows = [{"prompt": q, "answers": {}} for q in PROMPTS]
    for budget in args.budgets:
        outs = llm.generate(prompts, greedy, ComputeParams(compute_budget=budget), use_tqdm=False)
        for row, out in zip(rows, outs):
            o = out.outputs[0]
            row["answers"][str(budget)] = {"text": o.text, "mean_depth": sum(o.exit_depths) / max(len(o.exit_depths), 1)}
    D = ckpt.config.max_depth
    lines = ["| prompt | " + " | ".join(f"budget {b}" + (f" (all {D} layers)" if b == 1.0 else "") for b in args.budgets)
             + " |", "|---" * (len(args.budgets) + 1) + "|"]
    for r in rows:
        cells = [a["text"].strip().replace("\n", " ").replace("|", "\\|") + f" *(depth {a['mean_depth']:.1f})*"
                 for a in r["answers"].values()]
        lines.append(f"| {r['prompt']} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    write_results(args.out + ".json", {"model": args.model, "budgets": args.budgets, "rows": rows})
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
