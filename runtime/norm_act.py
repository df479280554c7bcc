"""RMSNorm and SwiGLU's activation as one native pass each (csrc/norm_act.c), for CPU inference.

`runtime.layers.RMSNorm` and `SwiGLU` take these where `native_rows` says they run: a CPU tensor of
the norm weight's dtype (fp32 or bf16), no autograd, no tracing or export, and a built library
(runtime/native.py). Elsewhere they keep torch's ops. The results follow torch's rounding op for op;
see the C source for where the last bit may differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime import native


def native_rows(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether rows x of this dtype take the native kernels here."""
    return (x.device.type == "cpu" and x.dtype == dtype and not torch.is_grad_enabled() and not native.traced()
            and native.available(dtype, x.device))


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RMSNorm of the rows of h = x (+ residual, rounded as torch's add) over the last dim, scaled by
    weight. Returns (h, the norm of h)."""
    d = x.shape[-1]
    if weight.shape != (d,) or weight.dtype != x.dtype or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)):
        raise ValueError(f"rms_norm: rows {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
                         + ("" if residual is None else f", residual {tuple(residual.shape)}") + " do not fit")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    h = x if residual is None else torch.empty_like(x)
    residual = None if residual is None else residual.contiguous()
    native.kernel("rms_norm", x.dtype)(x.data_ptr(), None if residual is None else residual.data_ptr(),
                                       weight.data_ptr(), out.data_ptr(), None if residual is None else h.data_ptr(),
                                       x.numel() // d if d else 0, d, eps, torch.get_num_threads())
    return h, out


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for rows gate_up (..., 2f) whose last dim is the gate's f values, then the up's."""
    f = gate_up.shape[-1] // 2
    if gate_up.shape[-1] != 2 * f:
        raise ValueError(f"silu_mul: the last dim of {tuple(gate_up.shape)} is not gate and up of one size")
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(*gate_up.shape[:-1], f)
    native.kernel("silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), out.numel() // f if f else 0, f,
                                             torch.get_num_threads())
    return out

