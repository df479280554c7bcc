"""Structured outputs on SmolLM2: JSON-schema validity, the throughput of a half-constrained batch
against an unconstrained one, and the mask time per step, in one run.

    python -m benchmarks.structured_outputs [--model checkpoints/smollm2-135m-exits] [--batch 16] [--rounds 3]

1. Validity: 20 chat requests (4 schemas x 5 subjects, sampled at temperature 0.7 with seeds),
   each constrained by its JSON schema; every output is parsed and checked against its schema
   (jsonschema_rs), and its finish reason is counted.
2. Throughput: `batch` chat prompts, greedy, max_tokens each, ignore_eos. Variant `free`: none
   constrained. Variant `mixed`: every other request constrained to a JSON object whose one string
   must be longer than max_tokens tokens can write, so constrained requests run exactly as long as
   free ones and both variants do the same work apart from the masks. Rounds rotate the order; the
   figure is the median over rounds of mixed/free tokens per second. The free requests' tokens must
   be the same in both variants (masks touch only their own rows).
3. Mask time per step: the engine's own count of time spent building bitmasks (the llguidance
   masks of the step's constrained rows), over the steps that built one; and the time of the batched
   op that applies the bitmask to the logits, at the batch's shape.

Writes results/structured-outputs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.harness import percentile, round_ratios, run_engine, run_rounds, set_threads, write_results
from runtime.chat_template import apply_chat_template
from runtime.checkpoint import PRETRAINED_MODEL, load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams, StructuredOutputs
from runtime.engine.sampler import apply_bitmask

NOVELS = ["Emma", "Persuasion", "Pride and Prejudice", "Sense and Sensibility", "Mansfield Park"]
_TEXT = {"type": "string", "maxLength": 40}
SCHEMAS = {
    "character": ({"type": "object", "properties": {
        "name": _TEXT, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "novel": {"enum": NOVELS},
        "traits": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 3}},
        "required": ["name", "age", "novel", "traits"], "additionalProperties": False},
        ["Emma Woodhouse", "Anne Elliot", "Elizabeth Bennet", "Elinor Dashwood", "Fitzwilliam Darcy"],
        "Describe the character {} as JSON with name, age, novel and traits."),
    "book": ({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "author": _TEXT,
        "year": {"type": "integer", "minimum": 1700, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["romance", "satire", "drama", "comedy", "history"]},
                   "maxItems": 3}},
        "required": ["title", "author", "year", "genres"], "additionalProperties": False},
        NOVELS, "Give the book {} as JSON with title, author, year and genres."),
    "city": ({"type": "object", "properties": {
        "city": _TEXT, "country": _TEXT, "population": {"type": "integer", "minimum": 0}, "capital": {"type": "boolean"}},
        "required": ["city", "country", "population", "capital"], "additionalProperties": False},
        ["Bath", "London", "Paris", "Lyme Regis", "Edinburgh"],
        "Describe the city of {} as JSON with city, country, population and capital."),
    "recipe": ({"type": "object", "properties": {
        "dish": _TEXT, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "ingredients": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"item": {"type": "string", "maxLength": 30},
                                             "grams": {"type": "integer", "minimum": 0, "maximum": 5000}},
            "required": ["item", "grams"], "additionalProperties": False}},
        "vegetarian": {"type": "boolean"}},
        "required": ["dish", "servings", "ingredients", "vegetarian"], "additionalProperties": False},
        ["an apple pie", "a pot of tea", "scones", "a roast chicken", "a summer salad"],
        "Write a recipe for {} as JSON with dish, servings, ingredients and vegetarian."),
}
# Bounds every output of the schemas above: at most ~170 characters of strings, a byte-level token per
# byte (4 per character at worst), plus the keys and numbers.
MAX_TOKENS = 768


def json_schema_requests() -> list[tuple[str, dict, str]]:
    """The 20 requests of the validity check: (name, schema, user message)."""
    return [(name, schema, prompt.format(subject)) for name, (schema, subjects, prompt) in SCHEMAS.items()
            for subject in subjects]


def long_schema(max_tokens: int) -> dict:
    """A JSON object whose one string cannot end within max_tokens tokens (a token is at most ~16 characters)."""
    return {"type": "object", "properties": {"story": {"type": "string", "minLength": 32 * max_tokens}},
            "required": ["story"], "additionalProperties": False}


def chat_ids(ckpt, message: str) -> list[int]:
    return ckpt.tokenizer.encode(apply_chat_template([{"role": "user", "content": message}], ckpt.chat_template)).ids


def validity(engine: LLMEngine, ckpt) -> dict:
    import jsonschema_rs

    requests = json_schema_requests()
    sampling = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.95, seed=i,
                               structured_outputs=StructuredOutputs(json=json.dumps(schema)))
                for i, (_, schema, _) in enumerate(requests)]
    prompts = [chat_ids(ckpt, message) for _, _, message in requests]
    structured = engine.executor.structured
    steps, seconds = structured.num_mask_steps, structured.mask_seconds
    run = run_engine(engine, prompts, 0, ComputeParams(), sampling)
    rows = []
    for (name, schema, _), tokens in zip(requests, run.tokens):
        text = ckpt.tokenizer.decode([t for t in tokens if t != ckpt.config.eos_id])
        try:
            valid = jsonschema_rs.validator_for(schema).is_valid(json.loads(text))
        except ValueError:
            valid = False
        rows.append({"schema": name, "valid": valid, "num_tokens": len(tokens),
                     "ended_by_grammar": len(tokens) < MAX_TOKENS, "text": text})
    num_steps = structured.num_mask_steps - steps
    return {"num_requests": len(rows), "num_valid": sum(r["valid"] for r in rows),
            "num_ended_by_grammar": sum(r["ended_by_grammar"] for r in rows),
            "mask_ms_per_step": 1e3 * (structured.mask_seconds - seconds) / max(num_steps, 1),
            "tokens_per_s": sum(len(t) for t in run.tokens) / run.wall_s, "outputs": rows}


def throughput(engine: LLMEngine, ckpt, batch: int, max_tokens: int, rounds: int) -> dict:
    prompts = [chat_ids(ckpt, f"Tell me a story about {subject}.") for subject in
               (s for _, (_, subjects, _) in SCHEMAS.items() for s in subjects)][:batch]
    prompts = (prompts * -(-batch // len(prompts)))[:batch]
    constraint = StructuredOutputs(json=json.dumps(long_schema(max_tokens)))

    def sampling(variant: str) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                               structured_outputs=constraint if variant == "mixed" and i % 2 else None)
                for i in range(batch)]

    structured = engine.executor.structured
    mask = {"steps": 0, "seconds": 0.0, "rows": 0}

    def once(variant: str) -> dict:
        before = (structured.num_mask_steps, structured.mask_seconds, structured.num_masked_rows)
        run = run_engine(engine, prompts, max_tokens, ComputeParams(), sampling(variant))
        if variant == "mixed":
            mask["steps"] += structured.num_mask_steps - before[0]
            mask["seconds"] += structured.mask_seconds - before[1]
            mask["rows"] += structured.num_masked_rows - before[2]
        assert all(len(t) == max_tokens for t in run.tokens), "every request runs to max_tokens"
        return {"tokens_per_s": batch * max_tokens / run.wall_s, "decode_tokens_per_s": run.decode_tokens_per_s,
                "itl_p50_ms": 1e3 * percentile(run.itl, 0.5), "itl_p99_ms": 1e3 * percentile(run.itl, 0.99),
                "mean_depth": statistics.fmean(run.depths), "free_tokens": run.tokens[::2]}

    once("mixed")  # warm-up: the token table and first masks
    results = run_rounds(["free", "mixed"], rounds, once, label="throughput")
    same = all(r["free"]["free_tokens"] == r["mixed"]["free_tokens"] for r in results)
    ratios = round_ratios(results, "mixed", "free", lambda r: r["tokens_per_s"])
    summary = {v: {k: statistics.median(r[v][k] for r in results) for k in
                   ("tokens_per_s", "decode_tokens_per_s", "itl_p50_ms", "itl_p99_ms", "mean_depth")}
               for v in ("free", "mixed")}
    return {"batch": batch, "max_tokens": max_tokens, "rounds": rounds, "num_constrained": batch // 2,
            "mixed_over_free": statistics.median(ratios), "ratios": ratios, "free_rows_unchanged": same,
            "mask_ms_per_step": 1e3 * mask["seconds"] / max(mask["steps"], 1),
            "masked_rows_per_step": mask["rows"] / max(mask["steps"], 1),
            "apply_ms_per_step": apply_time(batch, ckpt.config.vocab_size), **summary}


def apply_time(batch: int, vocab: int, reps: int = 50) -> float:
    """ms of the batched bitmask op on (batch, vocab) logits with every other row masked."""
    logits = torch.randn(batch, vocab)
    rows = list(range(1, batch, 2))
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), (vocab + 31) // 32), dtype=torch.int32)
    apply_bitmask(logits, rows, bitmask)
    start = time.perf_counter()
    for _ in range(reps):
        apply_bitmask(logits, rows, bitmask)
    return 1e3 * (time.perf_counter() - start) / reps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(PRETRAINED_MODEL))
    p.add_argument("--batch", type=int, default=16, help="requests in the throughput batch (half constrained)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per request in the throughput batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/structured-outputs.json")
    a = p.parse_args(argv)
    threads = set_threads(a.threads)
    ckpt = load_checkpoint(a.model)
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=max(32, a.batch), max_model_len=1024))
    valid = validity(engine, ckpt)
    print(f"validity: {valid['num_valid']}/{valid['num_requests']} outputs parse and validate against their JSON "
          f"schema; {valid['num_ended_by_grammar']} ended by the grammar (before max_tokens={MAX_TOKENS}); "
          f"mask {valid['mask_ms_per_step']:.3f} ms/step")
    tp = throughput(engine, ckpt, a.batch, a.max_tokens, a.rounds)
    print(f"throughput, batch {tp['batch']} ({tp['num_constrained']} constrained), {tp['max_tokens']} tokens each, "
          f"{tp['rounds']} rounds:")
    for v in ("free", "mixed"):
        s = tp[v]
        print(f"  {v:5s}  {s['tokens_per_s']:7.1f} tok/s  decode {s['decode_tokens_per_s']:7.1f} tok/s  "
              f"ITL p50 {s['itl_p50_ms']:.1f} ms  p99 {s['itl_p99_ms']:.1f} ms  mean depth {s['mean_depth']:.1f}")
    print(f"  mixed/free throughput: {tp['mixed_over_free']:.3f} (rounds: {', '.join(f'{r:.3f}' for r in tp['ratios'])}); "
          f"free rows' tokens unchanged: {tp['free_rows_unchanged']}")
    print(f"  mask {tp['mask_ms_per_step']:.3f} ms/step for {tp['masked_rows_per_step']:.1f} constrained rows, "
          f"applying it {tp['apply_ms_per_step']:.3f} ms/step")
    write_results(a.out, {"model": a.model, "threads": threads, "validity": valid, "throughput": tp})


if __name__ == "__main__":
    main()
