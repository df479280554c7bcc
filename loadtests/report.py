"""The load test's outputs: a JSON of every figure, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtests.metrics import max_throughput_under_itl_slo
from loadtests.runner import merge_histograms


def _f(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _accuracy(quality: dict, key: str) -> str:
    if key not in quality:
        return "n/a"
    lo, hi = quality[f"{key}_ci95"]
    return f"{quality[key]:.3f} ({lo:.3f}-{hi:.3f})"


def summarize_budgets(points: list[dict], budgets: list[float], itl_slo_ms: float | None,
                      quality: dict[float, dict] | None) -> tuple[dict, float | None, str]:
    """Per budget: throughput at the p99 ITL SLO, depth, saving, quality; and the SLO used and why."""
    why = "given with --itl-slo-ms"
    if itl_slo_ms is None:
        why = "none: no point of the first budget measured ITL without failures"
        base = [p for p in points if p["compute_budget"] == budgets[0] and p["failed"] == 0
                and not math.isnan(p["p99_itl_ms"])]  # no ITL without streaming
        if base:
            best = max(base, key=lambda p: p["output_throughput"])
            itl_slo_ms = best["p99_itl_ms"]
            why = f"the p99 ITL of budget {budgets[0]:g} at its highest-throughput load ({best['load']})"
    out = {}
    for b in budgets:
        mine = [p for p in points if p["compute_budget"] == b]
        at_slo = max_throughput_under_itl_slo(mine, itl_slo_ms) if itl_slo_ms is not None else None
        hist = merge_histograms(mine)
        tokens = sum(hist.values()) if hist else 0
        run = sum(p["server_core_steps"] for p in mine if p.get("server_core_steps_full"))
        full = sum(p["server_core_steps_full"] for p in mine if p.get("server_core_steps_full"))
        out[b] = {
            "throughput_at_itl_slo": at_slo["output_throughput"] if at_slo else None,
            "load_at_itl_slo": at_slo["load"] if at_slo else None,
            "max_output_throughput": max((p["output_throughput"] for p in mine), default=None),
            "server_mean_depth": sum(d * n for d, n in hist.items()) / tokens if tokens else None,
            "server_saved_fraction": 1.0 - run / full if full else None,
            "depth_histogram": hist,
            "failed": sum(p["failed"] for p in mine),
            "quality": (quality or {}).get(b),
        }
    ref = out[budgets[0]]["throughput_at_itl_slo"]
    for b in budgets:
        t = out[b]["throughput_at_itl_slo"]
        out[b]["ratio_vs_first_budget"] = t / ref if t is not None and ref else None
    return out, itl_slo_ms, why


def slo_table(points: list[dict], budgets: list[float]) -> list[dict]:
    """Throughput at each p99 ITL the first budget measured, taken as an SLO: the whole curve, not one cut."""
    slos = sorted({p["p99_itl_ms"] for p in points if p["compute_budget"] == budgets[0] and p["failed"] == 0
                   and not math.isnan(p["p99_itl_ms"])})
    rows = []
    for slo in slos:
        row = {"itl_slo_ms": slo}
        for b in budgets:
            best = max_throughput_under_itl_slo([p for p in points if p["compute_budget"] == b], slo)
            row[str(b)] = best["output_throughput"] if best else None
        rows.append(row)
    return rows


def _short(p: dict) -> str:
    """A point's load in a few characters: c8 (concurrency 8) or 2r (2 req/s)."""
    if math.isinf(p["request_rate"]):
        return f"c{p['max_concurrency']}" if p["max_concurrency"] else "all"
    return f"{p['request_rate']:g}r"


def plot_latency_throughput(points: list[dict], budgets: list[float], itl_slo_ms: float | None, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for b in budgets:
        mine = [p for p in points if p["compute_budget"] == b]  # in sweep order: the line follows rising load
        x = [p["output_throughput"] for p in mine]
        for ax, key in zip(axes, ("p99_itl_ms", "p50_ttft_ms", "p99_ttft_ms")):
            line, = ax.plot(x, [p[key] for p in mine], "o-", label=f"budget {b:g}")
            for p in mine:
                ax.annotate(_short(p), (p["output_throughput"], p[key]), fontsize=7, color=line.get_color(),
                            xytext=(3, 3), textcoords="offset points")
    for ax, title in zip(axes, ("p99 ITL", "p50 TTFT", "p99 TTFT")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} against throughput (labels: load)")
        ax.grid(alpha=0.3)
    if itl_slo_ms is not None:
        axes[0].axhline(itl_slo_ms, color="grey", ls="--", label=f"SLO {itl_slo_ms:.1f} ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth_histogram(summary: dict, path: Path) -> bool:
    hists = {b: s["depth_histogram"] for b, s in summary.items() if s["depth_histogram"]}
    if not hists:
        return False
    depths = sorted({d for h in hists.values() for d in h})
    width = 0.8 / len(hists)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (b, h) in enumerate(hists.items()):
        n = sum(h.values()) or 1
        mean = summary[b]["server_mean_depth"]
        ax.bar([d + (i - (len(hists) - 1) / 2) * width for d in depths], [h.get(d, 0) / n for d in depths], width,
               label=f"budget {b:g} (mean {_f(mean, 2)})")
    ax.set_xlabel("exit depth (core steps)")
    ax.set_ylabel("fraction of generated tokens")
    ax.set_title("Server-side exit depth of generated tokens")
    ax.set_xticks(depths)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: Path, config: dict, points: list[dict], budgets: list[float], itl_slo_ms: float | None,
                 quality: dict[float, dict] | None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, slo, why = summarize_budgets(points, budgets, itl_slo_ms, quality)
    plot_latency_throughput(points, budgets, slo, out_dir / "latency_vs_throughput.png")
    has_hist = plot_depth_histogram(summary, out_dir / "depth_histogram.png")
    table = slo_table(points, budgets)
    result = {"config": config, "itl_slo_ms": slo, "itl_slo_source": why,
              "summary": {str(b): s for b, s in summary.items()}, "throughput_at_itl_slos": table, "points": points}
    (out_dir / "loadtest.json").write_text(json.dumps(result, indent=1, default=str))

    lines = [f"# Load test: {config['model']} at {config['base_url']}", "",
             f"Workload: {config['dataset']} prompts (input {config['input_len']}, output {config['output_len']} tokens"
             f"{', EOS ignored' if config['ignore_eos'] else ''}), {config['num_prompts']} requests per point, "
             f"{'streaming' if config['stream'] else 'non-streaming'}, temperature {config['temperature']:g}, "
             f"loads: {', '.join(config['loads'])}. Budgets: {', '.join(f'{b:g}' for b in budgets)}.", "",
             "## Summary", "",
             f"Throughput at the p99 ITL SLO of {_f(slo)} ms ({why}): the highest output throughput among the "
             "measured loads whose p99 ITL met the SLO with no failed request.", "",
             "| budget | tok/s at SLO | ratio vs first | load at SLO | max tok/s | mean depth | saved steps "
             "| top-1 acc | top-5 acc | failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b, s in summary.items():
        q = s["quality"] or {}
        saved = s["server_saved_fraction"]
        lines.append(f"| {b:g} | {_f(s['throughput_at_itl_slo'])} | {_f(s['ratio_vs_first_budget'], 2)} "
                     f"| {s['load_at_itl_slo'] or 'none met it'} | {_f(s['max_output_throughput'])} "
                     f"| {_f(s['server_mean_depth'], 2)} | {_f(saved * 100 if saved is not None else None)}% "
                     f"| {_accuracy(q, 'top1_accuracy')} | {_accuracy(q, 'top5_accuracy')} | {s['failed']} |")
    lines += ["", "Mean depth: server-side mean exit depth of generated tokens (`ponder:token_exit_depth`); saved "
              "steps: 1 - core steps run / core steps at full depth, prompt tokens included "
              "(`ponder:core_steps_*_total`), both from /metrics scraped before and after each point.", ""]
    if len(table) > 1 and len(budgets) > 1:
        ref = str(budgets[0])
        lines += [f"Output tokens/s at each p99 ITL SLO that budget {budgets[0]:g} reached at some load "
                  "(ratio to it in brackets):", "",
                  "| p99 ITL SLO (ms) | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for row in table:
            cells = [f"{_f(row[str(b)])} (x{_f(row[str(b)] / row[ref] if row[str(b)] and row[ref] else None, 2)})"
                     for b in budgets]
            lines.append(f"| {_f(row['itl_slo_ms'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if quality:
        q0 = next(iter(quality.values()))
        lines += [f"Quality: teacher-forced next-token accuracy on {q0['num_samples']} windows of "
                  f"{config['quality_context']} tokens of `{config['quality_text']}` (95% Wilson intervals), "
                  "scored through /v1/completions with `logprobs=5` at each budget.", ""]
    lines += ["## Every point", "",
              "| budget | load | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | TPOT mean | E2E p50 "
              "| E2E p99 | goodput req/s | mean depth | failed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['compute_budget']:g} | {p['load']} | {_f(p['request_throughput'], 2)} | {_f(p['output_throughput'])} "
            f"| {_f(p['p50_ttft_ms'])} | {_f(p['p99_ttft_ms'])} | {_f(p['p50_itl_ms'])} | {_f(p['p99_itl_ms'])} "
            f"| {_f(p['mean_tpot_ms'])} | {_f(p['p50_e2el_ms'])} | {_f(p['p99_e2el_ms'])} "
            f"| {_f(p.get('request_goodput'), 2)} | {_f(p['server_mean_depth'], 2)} | {p['failed']} |")
    lines += ["", "Latencies in ms. ![latency against throughput](latency_vs_throughput.png)", ""]
    if has_hist:
        lines += ["![exit depth histogram](depth_histogram.png)", ""]
    if config.get("note"):
        lines += [config["note"], ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return result


def plot_soak(result: dict, path: Path) -> None:
    s = result["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rss = [x["rss_bytes"] / 2**20 if x["rss_bytes"] is not None else float("nan") for x in s]
    axes[0].plot(t, rss)
    axes[0].set_ylabel("server RSS (MiB)")
    axes[0].set_ylim(0, max((r for r in rss if not math.isnan(r)), default=1) * 1.2)
    axes[1].plot(t, [x["kv_cache_usage"] for x in s], label="KV usage (0-1)")
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("KV cache usage")
    axes[2].plot(t, [x["running"] for x in s], label="running")
    axes[2].plot(t, [x["waiting"] for x in s], label="waiting")
    axes[2].plot(t, [x["failed"] for x in s], label="failed (cumulative)")
    axes[2].legend()
    axes[2].set_ylabel("requests")
    for ax in axes:
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Soak at {result['load']}: {result['completed']} completed, {result['failed']} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
