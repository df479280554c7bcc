import pytest
import torch

from runtime.checkpoint import DEFAULT_MODEL
from runtime.devices import native_bf16, resolve_device, resolve_dtype
from runtime.engine.llm import LLM
from runtime.engine.params import ComputeParams, SamplingParams


def test_cpu_and_clear_errors_for_missing_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_device("tpu")


def test_dtypes_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_dtype("int4", cpu)


def test_bf16_engine_tracks_fp32_on_the_default_model():
    prompt = "It is a truth universally acknowledged, that"
    params, compute = SamplingParams(max_tokens=8, temperature=0), ComputeParams(compute_budget=1.0)
    fp32 = LLM(DEFAULT_MODEL, device="cpu", dtype="float32").generate(prompt, params, compute, use_tqdm=False)[0]
    bf16_llm = LLM(DEFAULT_MODEL, device="cpu", dtype="bfloat16")
    assert bf16_llm.engine.cache.k.dtype == torch.bfloat16
    bf16 = bf16_llm.generate(prompt, params, compute, use_tqdm=False)[0]
    assert bf16.outputs[0].exit_depths == [6] * 8
    # bf16 rounding may flip a near-tie late in the sequence; the first tokens agree.
    assert bf16.outputs[0].token_ids[:3] == fp32.outputs[0].token_ids[:3]
