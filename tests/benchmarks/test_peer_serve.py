"""The peer benchmark runs end to end on a tiny Llama: weights prepared once, a real `ponder serve`
driven point by point, figures in the JSON and a PNG. With vLLM (marked `vllm`) both servers run
under `vllm bench serve`."""

import json
import os
from pathlib import Path

import pytest

from benchmarks.peer_serve import Point, main, prepare_weights

SYMBOLS = [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(26)] + list(" .,!?-'\n;:01")
VLLM_PYTHON = os.environ.get("PONDER_VLLM_PYTHON", str(Path(__file__).resolve().parents[2] / ".venv-vllm/bin/python"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama (width 128) with a symbol tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from training.tasks import symbol_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    # head_dim 64 (as SmolLM2's): vLLM's CPU attention has kernels for a few head sizes only.
    cfg = LlamaConfig(vocab_size=len(SYMBOLS), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=symbol_tokenizer(SYMBOLS), eos_token="a", pad_token="a")
    tokenizer.save_pretrained(out)
    return out


def test_points_parse_with_default_and_scaled_prompt_counts():
    assert Point.parse("128x64@8:16") == Point(128, 64, 8, 16)
    assert Point.parse("1024x32@8") == Point(1024, 32, 8, 16)  # default: two waves
    assert Point.parse("128x64@8:16", scale=0.25).num_prompts == 8  # never fewer prompts than in flight
    with pytest.raises(Exception, match="INxOUT@CONCURRENCY"):
        Point.parse("128@8")


def test_weights_are_prepared_once_as_the_same_tensors(tiny_llama, tmp_path):
    from safetensors import safe_open

    hf_dir, ponder_dir = prepare_weights(str(tiny_llama), tmp_path)
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = safe_open(str(hf_dir / "model.safetensors"), "pt")
    ours = safe_open(str(ponder_dir / "model.safetensors"), "pt")
    assert (hf.get_tensor("model.layers.1.mlp.up_proj.weight") == ours.get_tensor("pool.1.mlp.w_up.weight")).all()
    stamp = (hf_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_weights(str(tiny_llama), tmp_path) == (hf_dir, ponder_dir)
    assert (hf_dir / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not written again


def test_ponder_half_runs_and_writes_figures(tiny_llama, tmp_path):
    out = tmp_path / "peer.json"
    result = main(["--source", str(tiny_llama), "--cache", str(tmp_path / "cache"), "--servers", "ponder",
                   "--client", "loadtests", "--points", "8x4@1:2,8x4@2:4", "--rounds", "1", "--threads", "1",
                   "--max-model-len", "64", "--max-num-batched-tokens", "64", "--kv-cache-gib", "0.01",
                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert [p["key"] for p in saved["points"]] == ["8x4@1", "8x4@2"] == [p["key"] for p in result["points"]]
    for point, n in zip(saved["rounds"][0]["ponder"].values(), (2, 4)):
        assert point["completed"] == n and point["failed"] == 0
        assert point["total_output_tokens"] == 4 * n  # ignore_eos: every request ran to max_tokens
        assert point["output_throughput"] > 0 and point["mean_ttft_ms"] > 0 and point["mean_itl_ms"] > 0
    assert "ratio_output_throughput" not in saved["points"][0]  # one server: no ratio
    assert len(saved["stop_s"]["ponder"]) == 1 and saved["stop_s"]["ponder"][0] < 60  # its group gone, not killed


@pytest.mark.vllm
def test_both_servers_under_vllm_bench_serve(tiny_llama, tmp_path):
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}; set PONDER_VLLM_PYTHON (see CONTRIBUTING.md)")
    out = tmp_path / "peer.json"
    main(["--source", str(tiny_llama), "--cache", str(tmp_path / "cache"), "--client", "vllm",
          "--vllm-python", VLLM_PYTHON, "--points", "16x4@2:4", "--rounds", "2", "--max-model-len", "64",
          "--max-num-batched-tokens", "64", "--kv-cache-gib", "0.05", "--out", str(out)])
    (point,) = json.loads(out.read_text())["points"]
    assert point["ponder"]["output_throughput"] > 0 and point["vllm"]["output_throughput"] > 0
    assert len(point["round_ratios"]) == 2 and point["ratio_output_throughput"] > 0


def test_a_server_is_stopped_with_every_process_it_started():
    """A child that ignores SIGTERM (as an engine core busy in a step might) is killed, and nothing of the
    group is left to run beside the next server."""
    import subprocess
    import sys
    import time

    from benchmarks.peer_serve import group_members, stop_group

    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(group_members(proc.pid)) == 2
    stop_group(proc, timeout=1.0)
    assert proc.returncode is not None and group_members(proc.pid) == []
