"""Device and dtype selection: --device auto|cpu|cuda|mps, --dtype auto|float32|bfloat16|float16.

--dtype auto is bfloat16 where the device multiplies it natively (a bf16-capable GPU, a CPU with
avx512_bf16 or AMX), else float32: on a CPU without bf16 units torch emulates it, slower than fp32.
On one AVX-512 CPU with avx512_bf16 the SmolLM2 engine ran a 1024-token prefill 1.8x faster in
bf16 and 16 decode rows 1.5x faster; so the choice is made per machine at start-up, never fixed."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this torch build or on this machine; "
                             "use --device cpu or auto")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps: MPS is not available here (it needs Apple silicon); use --device cpu or auto")
        return torch.device("mps")
    raise ValueError(f"--device {name!r} must be one of auto, cpu, cuda, cuda:N, mps")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} must be one of auto, float32, bfloat16, float16")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("--dtype float16 is not supported on CPU (matmuls are slow or missing); use bfloat16 or float32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype bfloat16 is not supported on this GPU; use float16 or float32")
    return dtype


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a bf16-capable GPU, or a CPU with avx512_bf16 or AMX
    (elsewhere torch emulates bf16 on CPU, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False
