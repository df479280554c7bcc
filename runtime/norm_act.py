"""RMSNorm and SwiGLU's activation as one native pass each (csrc/norm_act.c), and the exit head's
score as one call (csrc/exit_head.c), for CPU inference.

`runtime.layers.RMSNorm` and `SwiGLU`, and `runtime.model.ExitHead`, take these where `native_rows`
says they run: a CPU tensor of the weights' dtype (fp32 or bf16), no autograd, no tracing or export,
and a built library (runtime/native.py). Elsewhere they keep torch's ops. The results follow torch's rounding op for op;
see the C source for where the last bit may differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime import native
from runtime.row_buckets import empty_rows


def native_rows(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether rows x of this dtype take the native kernels here."""
    return (x.device.type == "cpu" and x.dtype == dtype and not torch.is_grad_enabled() and not native.traced()
            and native.available(dtype, x.device))


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RMSNorm of the rows of h = x (+ residual, rounded as torch's add) over the last dim, scaled by
    weight. Returns (h, the norm of h)."""
    d = x.shape[-1]
    bad_residual = residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)
    if weight.shape != (d,) or weight.dtype != x.dtype or bad_residual:
        raise ValueError(f"rms_norm: rows {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
                         + ("" if residual is None else f", residual {tuple(residual.shape)}") + " do not fit")
    x, weight = x.contiguous(), weight.contiguous()
    out = empty_rows(x.shape, x)  # it feeds a linear: with room for the rows' bucket
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
    out = empty_rows((*gate_up.shape[:-1], f), gate_up)  # it feeds a linear: with room for the rows' bucket
    native.kernel("silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), out.numel() // f if f else 0, f,
                                             torch.get_num_threads())
    return out



# The exit head's kernel first ran one GEMV per row: against torch's two small GEMMs it won at 1-8 rows
# (32 against 86 us at 1 row, bf16, 2 threads, one AMX CPU), tied at 16 and lost at 300 (742 against
# 227 us). So decode steps take it and prompt-sized calls keep torch's ops. Its fc now runs through
# linear_rows.c (8 rows: 28 -> 15 us, one Zen 5 CPU); the cap is the one measured for the GEMV kernel.
EXIT_HEAD_MAX_ROWS = 16


class ExitScorer:
    """The exit head's kernel with its parameters checked once: scorer(x, s) is
    softplus(out(gelu(fc(rms_norm(x)) + step_bias[s]))) for rows x (..., d), in x's dtype. fc_weight
    (hidden, d), out_weight (1, hidden); biases (hidden,) and (1,); step_bias (steps, hidden) or None.
    A decode step scores at every priced core step: checked per call, the head's few microseconds of
    kernel cost 4-5x that in Python (bf16, one Zen 5 CPU)."""

    def __init__(self, norm_weight: Tensor, eps: float, fc_weight: Tensor, fc_bias: Tensor, step_bias: Tensor | None,
                 out_weight: Tensor, out_bias: Tensor) -> None:
        hidden, d = fc_weight.shape
        params = (norm_weight, fc_weight, fc_bias, out_weight, out_bias) + (() if step_bias is None else (step_bias,))
        if (norm_weight.shape != (d,) or fc_bias.shape != (hidden,) or out_weight.shape != (1, hidden)
                or out_bias.shape != (1,) or (step_bias is not None and (step_bias.dim() != 2 or step_bias.shape[1] != hidden))
                or any(p.dtype != fc_weight.dtype for p in params)):
            raise ValueError(f"exit_scores: the head's {[(tuple(p.shape), str(p.dtype)) for p in params]} do not fit")
        self.params = tuple(p.contiguous() for p in params)  # held: the kernel reads them by address
        self.eps, self.d, self.hidden, self.dtype = eps, d, hidden, fc_weight.dtype
        self.steps = 0 if step_bias is None else step_bias.shape[0]
        self.ptrs = [p.data_ptr() for p in self.params]
        self.kernel = native.kernel("exit_scores", self.dtype)

    def __call__(self, x: Tensor, s: int = 0) -> Tensor:
        if x.shape[-1] != self.d or x.dtype != self.dtype or (self.steps and not 0 <= s < self.steps):
            raise ValueError(f"exit_scores: rows {tuple(x.shape)} {x.dtype} at step {s} do not fit the head's "
                             f"width {self.d}, {self.dtype} and {self.steps} step biases")
        norm_w, fc_w, fc_b, out_w, out_b, *step_b = self.ptrs
        step_bias = step_b[0] + s * self.hidden * self.params[-1].element_size() if step_b else None
        x = x.contiguous()
        out = torch.empty(x.shape[:-1], dtype=x.dtype)
        status = self.kernel(x.data_ptr(), norm_w, self.eps, fc_w, fc_b, step_bias, out_w, out_b, out.data_ptr(),
                             out.numel(), self.d, self.hidden, torch.get_num_threads())
        if status != 0:
            raise ValueError(f"exit_scores: model width {self.d} or exit hidden {self.hidden} past the kernel's "
                             f"8192 and 1024, or no memory for {x.numel() // self.d} rows")
        return out


def exit_scores(x: Tensor, norm_weight: Tensor, eps: float, fc_weight: Tensor, fc_bias: Tensor,
                step_bias: Tensor | None, out_weight: Tensor, out_bias: Tensor) -> Tensor:
    """One call of `ExitScorer`, with step_bias the step's row (hidden,) or None."""
    if step_bias is not None and step_bias.shape != fc_bias.shape:
        raise ValueError(f"exit_scores: step bias {tuple(step_bias.shape)} and the head's bias "
                         f"{tuple(fc_bias.shape)} do not fit")
    step_bias = None if step_bias is None else step_bias[None]
    return ExitScorer(norm_weight, eps, fc_weight, fc_bias, step_bias, out_weight, out_bias)(x)
