"""Greedy chat completions at full depth and at a lower budget, side by side (Markdown + JSON).

    python -m benchmarks.side_by_side --model checkpoints/smollm2-135m-exits --budget 0.6 --out results/smollm2-generations
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.harness import write_results
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
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default="results/generations")
    args = p.parse_args()
    llm = LLM(args.model)
    ckpt = llm.engine.ckpt
    prompts = [apply_chat_template([{"role": "user", "content": q}], ckpt.chat_template) for q in PROMPTS]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    rows = []
    for budget in (1.0, args.budget):
        outs = llm.generate(prompts, greedy, ComputeParams(compute_budget=budget), use_tqdm=False)
        for i, out in enumerate(outs):
            o = out.outputs[0]
            if budget == 1.0:
                rows.append({"prompt": PROMPTS[i]})
            key = "full" if budget == 1.0 else "budget"
            rows[i][key] = o.text
            rows[i][key + "_mean_depth"] = sum(o.exit_depths) / max(len(o.exit_depths), 1)
    D = ckpt.config.max_depth
    lines = [f"| prompt | full depth ({D} layers) | budget {args.budget} |", "|---|---|---|"]
    for r in rows:
        cell = lambda text, depth: text.strip().replace("\n", " ").replace("|", "\\|") + f" *(depth {depth:.1f})*"  # noqa: E731
        lines.append(f"| {r['prompt']} | {cell(r['full'], r['full_mean_depth'])} | {cell(r['budget'], r['budget_mean_depth'])} |")
    print("\n".join(lines))
    write_results(args.out + ".json", {"model": args.model, "budget": args.budget, "rows": rows})
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
