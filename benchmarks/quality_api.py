"""Held-out quality per compute budget through the HTTP API, scored by lm-eval, a third-party harness.

    python -m benchmarks.quality_api --checkpoints checkpoints/smollm2-135m-exits [--budgets 1.0,0.8,0.6]

For each checkpoint and budget, `ponder serve --default-compute-budget B` serves the checkpoint and
lm-eval's `local-completions` model scores held-out Persuasion passages through /v1/completions
(`loglikelihood_rolling`: echo=true, logprobs, max_tokens=0, as it scores any OpenAI-style server).
lm-eval runs from its own venv (`--lm-eval`, default .venv-lmeval/bin/lm_eval; CONTRIBUTING.md
says how to make it). The passages are consecutive 256-token windows of Persuasion, decoded to
text; lm-eval re-tokenizes them with the Hugging Face tokenizer of the same weights.

Figures: token perplexity (from lm-eval's word perplexity and the passages' word and token
counts), word perplexity, and the change against full depth of the same checkpoint. Writes JSON
(results/quality-api.json) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.harness import csv_of, pyplot, write_results
from benchmarks.soak import start_server_with

REPO = Path(__file__).resolve().parent.parent
TASK = "persuasion_ppl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=csv_of(str), default=["checkpoints/smollm2-135m-exits"])
    p.add_argument("--budgets", type=csv_of(float), default=[1.0, 0.8, 0.6])
    p.add_argument("--passages", type=int, default=20, help="Persuasion windows of --window tokens to score")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="the engine core's torch threads")
    p.add_argument("--dtype", default="float32",
                   help="the server's --dtype (float32, as the published quality figures; auto for a machine's default)")
    p.add_argument("--lm-eval", default=str(REPO / ".venv-lmeval" / "bin" / "lm_eval"))
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer directory for lm-eval (default: SmolLM2's, "
                                       "as benchmarks.peer_serve prepares it)")
    p.add_argument("--out", default="results/quality-api.json")
    args = p.parse_args(argv)
    if not all(0 < b <= 1 for b in args.budgets) or args.passages < 1 or args.window < 2 or args.threads < 1:
        p.error("--budgets must be in (0, 1], --passages and --threads >= 1, --window >= 2")
    if not Path(args.lm_eval).is_file():
        p.error(f"--lm-eval {args.lm_eval} does not exist; make the venv as CONTRIBUTING.md says")
    return args


def write_task(checkpoint: str, passages: int, window: int, root: Path) -> tuple[Path, list[str]]:
    """An lm-eval task directory scoring `passages` Persuasion windows, and the passages' texts."""
    from runtime.checkpoint import load_tokenizer
    from training.text_windows import windows

    tokenizer, _ = load_tokenizer(checkpoint)
    texts = [tokenizer.decode(w.tolist()) for w in windows(tokenizer, "test", window, passages)]
    data = root / "passages.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return root, texts


def lm_eval(args: argparse.Namespace, base: str, model_name: str, task_dir: Path, tokenizer_dir: Path, out: Path) -> dict:
    """One lm-eval run against a server; its results for the task."""
    model_args = (f"model={model_name},base_url={base}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={tokenizer_dir},max_length=2048,num_concurrent=1,max_retries=1")
    cmd = [args.lm_eval, "--model", "local-completions", "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(task_dir), "--output_path", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                                                    "PATH": "/usr/bin:/bin"})
    if run.returncode != 0:
        raise RuntimeError(f"lm-eval failed ({run.returncode}):\n{run.stderr[-3000:]}")
    results = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)[-1]
    return json.loads(results.read_text())["results"][TASK]


def token_ppl(word_ppl: float, texts: list[str], tokenizer_dir: Path) -> tuple[float, int]:
    """Token perplexity from lm-eval's word perplexity: the same total NLL over the token count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    words = sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval's word count for word_perplexity
    tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
    return math.exp(math.log(word_ppl) * words / tokens), tokens


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else _smollm2_hf_dir()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quality-api-") as tmp:
        task_dir, texts = write_task(args.checkpoints[0], args.passages, args.window, Path(tmp))
        for checkpoint in args.checkpoints:
            for budget in args.budgets:
                name = Path(checkpoint).name
                start = time.perf_counter()
                proc, base = start_server_with(checkpoint, args.threads, "--default-compute-budget", str(budget),
                                               "--served-model-name", name, "--dtype", args.dtype)
                try:
                    result = lm_eval(args, base, name, task_dir, tokenizer_dir, Path(tmp) / f"{name}-{budget}")
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                word = result["word_perplexity,none"]
                ppl, tokens = token_ppl(word, texts, tokenizer_dir)
                rows.append({"checkpoint": checkpoint, "budget": budget, "token_ppl": ppl, "word_ppl": word,
                             "bits_per_byte": result["bits_per_byte,none"], "tokens": tokens,
                             "seconds": time.perf_counter() - start})
                print(f"{name} budget {budget:.2f}: token ppl {ppl:8.2f}  word ppl {word:8.2f}  "
                      f"({tokens} tokens, {rows[-1]['seconds']:.0f}s)", flush=True)
    for row in rows:
        full = next((r for r in rows if r["checkpoint"] == row["checkpoint"] and r["budget"] == 1.0), None)
        row["vs_full"] = row["token_ppl"] / full["token_ppl"] - 1 if full else None
    result = {"benchmark": "quality_api", "harness": "lm-eval local-completions, loglikelihood_rolling",
              "text": f"Persuasion (held out), {args.passages} windows of {args.window} tokens", "rows": rows}
    print_table(result)
    write_results(args.out, result, lambda path: plot(result, path))
    return result


def _smollm2_hf_dir() -> Path:
    from benchmarks.peer_serve import prepare_weights

    return prepare_weights("smollm2-135m")[0]


def print_table(result: dict) -> None:
    print(f"\n{'checkpoint':>28} {'budget':>6} {'token ppl':>9} {'vs full':>8}")
    for r in result["rows"]:
        vs = f"{r['vs_full']:+.1%}" if r["vs_full"] is not None else "-"
        print(f"{Path(r['checkpoint']).name:>28} {r['budget']:6.2f} {r['token_ppl']:9.2f} {vs:>8}")


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for checkpoint in dict.fromkeys(r["checkpoint"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["checkpoint"] == checkpoint), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in rows], [r["token_ppl"] for r in rows], "o-", label=Path(checkpoint).name)
    ax.set(xlabel="compute budget", ylabel="token perplexity (lm-eval, via the API)", yscale="log",
           title=result["text"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
