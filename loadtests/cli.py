"""`ponder loadtest`: a black-box load generator for an OpenAI-compatible server (HTTP only).

Sweeps compute budgets x loads (request rates with gamma/Poisson arrivals, or fixed concurrencies),
reports vLLM-style latency and throughput figures with the server's exit depth and compute saving,
scores quality per budget, and writes results/loadtest/{report.md, loadtest.json, *.png}.
`--soak SECONDS` instead holds one moderate load and tracks the server's memory and KV usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

MAX_PROMPTS = 10_000
MAX_POINT_SECONDS = 3600.0
MAX_SOAK_SECONDS = 4 * 3600.0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers `loadtest` on a parent command's subparsers (the `ponder` command's)."""
    s = sub.add_parser("loadtest", help="load-test an OpenAI-compatible server: budgets x loads, or a soak",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(s)


def add_arguments(s: argparse.ArgumentParser) -> None:
    t = s.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (loopback unless --allow-remote)")
    t.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --base-url you own")
    t.add_argument("--model", help="model name (default: the first of /v1/models)")
    t.add_argument("--api-key")
    w = s.add_argument_group("workload")
    w.add_argument("--dataset", choices=("random", "file", "chat"), default="random",
                   help="random: --input-len random ordinary token ids; file: paragraphs of --prompt-file; "
                        "chat: paragraphs (or built-in questions) as user messages to /v1/chat/completions")
    w.add_argument("--prompt-file", help="text file for --dataset file/chat (and the random token pool)")
    w.add_argument("--input-len", type=int, default=32, help="prompt tokens (random) or at most words (file, chat)")
    w.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ignore_eos, so every request yields --output-len)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming requests (no ITL)")
    w.add_argument("--num-prompts", type=int, default=64, help="requests per sweep point")
    w.add_argument("--request-rates", type=_floats, help="sweep of request rates (req/s, 'inf' = all at once)")
    w.add_argument("--concurrencies", type=_ints, help="sweep of fixed concurrencies (closed loop)")
    w.add_argument("--max-concurrency", type=int, help="cap on requests in flight with --request-rates")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    w.add_argument("--budgets", type=_floats, default=[1.0],
                   help="compute_budget sweep, e.g. 1.0,0.75,0.5 (the first is the reference for ratios)")
    w.add_argument("--seed", type=int, default=0)
    m = s.add_argument_group("metrics")
    m.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    m.add_argument("--itl-slo-ms", type=float,
                   help="p99 ITL SLO for throughput-at-SLO (default: the first budget's p99 ITL at its best load)")
    m.add_argument("--quality-text", help="held-out text for next-token accuracy per budget (skipped if absent)")
    m.add_argument("--quality-samples", type=int, default=256)
    m.add_argument("--quality-context", type=int, default=64, help="tokens of context per quality window")
    b = s.add_argument_group("bounds and output")
    b.add_argument("--max-duration", type=float, default=120.0, help="seconds per point before sending stops")
    b.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    b.add_argument("--soak", type=float, metavar="SECONDS", help="soak instead of sweep, at one --request-rates")
    b.add_argument("--sample-every", type=float, default=5.0, help="soak: seconds between /metrics samples")
    b.add_argument("--server-pid", type=int, help="soak: read the server's RSS from /proc/PID (else /metrics)")
    b.add_argument("--note", help="a line added to the report (e.g. the machine's conditions)")
    b.add_argument("--out", default="results/loadtest", help="output directory")
    s.set_defaults(func=run_loadtest)


def validate(args: argparse.Namespace) -> None:
    """Every user-facing bound, with the fix in the message."""
    from loadtests.metrics import parse_slos

    if args.request_rates and args.concurrencies:
        raise ValueError("give --request-rates or --concurrencies, not both")
    if not 1 <= args.num_prompts <= MAX_PROMPTS:
        raise ValueError(f"--num-prompts must be in [1, {MAX_PROMPTS}], got {args.num_prompts}")
    if args.input_len < 1 or args.output_len < 1:
        raise ValueError(f"--input-len and --output-len must be at least 1, got {args.input_len}, {args.output_len}")
    for r in args.request_rates or []:
        if not r > 0:
            raise ValueError(f"--request-rates: {r} is not a positive rate (use inf for all at once)")
    for c in (args.concurrencies or []) + ([args.max_concurrency] if args.max_concurrency is not None else []):
        if c < 1:
            raise ValueError(f"concurrency must be at least 1, got {c}")
    if not args.budgets:
        raise ValueError("--budgets is empty")
    for x in args.budgets:
        if not 0 < x <= 1:
            raise ValueError(f"--budgets: {x} is outside (0, 1]")
    if not 0 < args.max_duration <= MAX_POINT_SECONDS:
        raise ValueError(f"--max-duration must be in (0, {MAX_POINT_SECONDS:g}] seconds, got {args.max_duration}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be positive, got {args.request_timeout}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.itl_slo_ms is not None and not args.itl_slo_ms > 0:
        raise ValueError(f"--itl-slo-ms must be positive, got {args.itl_slo_ms}")
    if args.dataset == "file" and not args.prompt_file:
        raise ValueError("--dataset file needs --prompt-file PATH")
    for path in (args.prompt_file, args.quality_text):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path!r} does not exist")
    if args.quality_samples < 1 or args.quality_context < 1:
        raise ValueError("--quality-samples and --quality-context must be at least 1")
    if args.soak is not None:
        if not 0 < args.soak <= MAX_SOAK_SECONDS:
            raise ValueError(f"--soak must be in (0, {MAX_SOAK_SECONDS:g}] seconds, got {args.soak}")
        if not args.request_rates or len(args.request_rates) != 1 or math.isinf(args.request_rates[0]):
            raise ValueError("--soak needs exactly one finite --request-rates value (a moderate load)")
        if len(args.budgets) != 1:
            raise ValueError("--soak runs one budget; give a single --budgets value")
        if not args.sample_every > 0:
            raise ValueError(f"--sample-every must be positive, got {args.sample_every}")
    args.slos = parse_slos(args.goodput)


def run_loadtest(args: argparse.Namespace) -> None:
    import aiohttp

    from loadtests.client import check_target

    validate(args)
    args.base_url = check_target(args.base_url, args.allow_remote)
    try:
        asyncio.run(_main(args))
    except (RuntimeError, aiohttp.ClientError, OSError) as e:  # the server is down, refused or broke a response
        print(f"ponder loadtest: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def loads_of(args: argparse.Namespace) -> list:
    from loadtests.runner import Load

    if args.concurrencies:
        return [Load(math.inf, c) for c in args.concurrencies]
    if args.request_rates:
        return [Load(r, args.max_concurrency) for r in args.request_rates]
    return [Load(math.inf, args.max_concurrency or 8)]


async def build_prompts(client, args: argparse.Namespace, num: int) -> list:
    from loadtests import workload
    from loadtests.quality import tokenize

    if args.dataset == "random":
        seed_text = Path(args.prompt_file).read_text(encoding="utf-8")[:20000] if args.prompt_file else workload.SEED_TEXT
        pool = sorted(set(await tokenize(client, seed_text)))
        return workload.random_token_prompts(pool, num, args.input_len, args.seed)
    if args.dataset == "file":
        return workload.file_prompts(workload.paragraphs(args.prompt_file), num, args.input_len, args.seed)
    texts = workload.paragraphs(args.prompt_file) if args.prompt_file else list(workload.DEFAULT_CHAT_QUESTIONS)
    return workload.chat_prompts(texts, num, args.input_len, args.seed)


async def _main(args: argparse.Namespace) -> None:
    from loadtests.client import Client
    from loadtests.report import plot_soak, write_report
    from loadtests.runner import run_point, soak

    client = Client(args.base_url, args.model, args.api_key, args.request_timeout)
    out = Path(args.out)
    try:
        if await client.get_text("/v1/models") is None and args.model is None:
            raise RuntimeError(f"no OpenAI-compatible server answers at {args.base_url}/v1/models")
        model = await client.resolve_model()
        prompts = await build_prompts(client, args, args.num_prompts)
        base = {"temperature": args.temperature, **({"ignore_eos": True} if args.ignore_eos else {})}
        if args.soak is not None:
            load = loads_of(args)[0]
            print(f"soak: {args.soak:g}s at {load.label}, budget {args.budgets[0]:g}, against {args.base_url} ({model})")
            result = await soak(client, prompts, load, args.output_len, args.stream,
                                {**base, "compute_budget": args.budgets[0]}, args.soak, args.sample_every,
                                args.burstiness, args.seed, args.server_pid)
            result |= {"model": model, "base_url": args.base_url, "compute_budget": args.budgets[0],
                       "input_len": args.input_len, "output_len": args.output_len, "dataset": args.dataset,
                       "note": args.note}
            out.mkdir(parents=True, exist_ok=True)
            (out / "soak.json").write_text(json.dumps(result, indent=1))
            plot_soak(result, out / "soak.png")
            print(f"soak: {result['completed']} completed, {result['failed']} failed; RSS "
                  f"{_mb(result['rss_first_quarter_mb'])} -> {_mb(result['rss_last_quarter_mb'])} MiB (first -> last "
                  f"quarter); KV usage {result['kv_usage_first_quarter']} -> {result['kv_usage_last_quarter']}, "
                  f"{result['kv_usage_end']} after the load. Wrote {out / 'soak.json'} and {out / 'soak.png'}")
            return

        loads = loads_of(args)
        points = []
        # Budgets are interleaved within each load, so drift on a shared machine hits them alike.
        for load in loads:
            for b in args.budgets:
                extra = {**base, "compute_budget": b}
                p = await run_point(client, prompts, load, args.output_len, args.stream, extra, args.burstiness,
                                    args.max_duration, args.seed, args.slos, desc=f"budget {b:g}, {load.label}")
                p["compute_budget"] = b
                points.append(p)
                print(f"budget {b:<5g} {load.label:<22} {p['output_throughput']:8.1f} tok/s  "
                      f"TTFT p50/p99 {p['p50_ttft_ms']:7.1f}/{p['p99_ttft_ms']:7.1f} ms  "
                      f"ITL p50/p99 {p['p50_itl_ms']:6.1f}/{p['p99_itl_ms']:6.1f} ms  "
                      f"depth {_mb(p['server_mean_depth'], 2)}  failed {p['failed']}", flush=True)
        quality = None
        if args.quality_text:
            from loadtests.quality import make_windows, score

            text = Path(args.quality_text).read_text(encoding="utf-8")
            windows = await make_windows(client, text, args.quality_samples, args.quality_context)
            quality = {b: await score(client, windows, {"compute_budget": b}, desc=f"quality, budget {b:g}")
                       for b in args.budgets}
        config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
        config |= {"model": model, "loads": [ld.label for ld in loads]}
        result = write_report(out, config, points, args.budgets, args.itl_slo_ms, quality)
        for b, s in result["summary"].items():
            q = s["quality"] or {}
            print(f"budget {b}: {_mb(s['throughput_at_itl_slo'])} tok/s at p99 ITL <= {_mb(result['itl_slo_ms'])} ms "
                  f"(x{_mb(s['ratio_vs_first_budget'], 2)}), mean depth {_mb(s['server_mean_depth'], 2)}, "
                  f"top-1 accuracy {_mb(q.get('top1_accuracy'), 3)}")
        print(f"wrote {out / 'report.md'}, {out / 'loadtest.json'} and plots")
    finally:
        await client.close()


def _mb(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtests.cli ...`: the load generator without the rest of Ponder installed."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_loadtest(args)
    except (ValueError, OSError) as e:  # bad arguments, missing files: the same exit code as `ponder loadtest`
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
