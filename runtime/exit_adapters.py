"""A decode step's exit adapters in one native call (csrc/exit_head.c: exit_adapters).

`runtime.model.ExitAdapter` translates a state that left the core at depth k for the final norm and
head: h + up_k(down_k(h)). A step's rows leave at several depths; as torch ops each depth cost about
eight dispatches and two module calls (0.6-0.9 ms a budget-0.6 decode step at batch 8-16, bf16, one
Zen 5 CPU). `StackedAdapters` keeps every depth's weights in three tensors (each adapter's parameters
become views of them, so nothing is copied and the modules keep reading the same numbers) and runs
the rows of all depths in one call, each depth's rows as two calls of the native linear kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from runtime import native
from runtime.norm_act import native_rows


def _stack(params: list[nn.Parameter]) -> tuple[Tensor, list[nn.Parameter]]:
    stacked = torch.stack([p.detach() for p in params])
    return stacked, [nn.Parameter(stacked[k], requires_grad=False) for k in range(len(params))]


class StackedAdapters:
    """The adapters of depths 0 .. max_depth - 1 (a ModuleList of ExitAdapter), stacked for inference."""

    def __init__(self, adapters: nn.ModuleList) -> None:
        self.down, downs = _stack([a.down.weight for a in adapters])  # (D, rank, d)
        self.up, ups = _stack([a.up.weight for a in adapters])  # (D, d, rank)
        self.up_bias, biases = _stack([a.up.bias for a in adapters])  # (D, d)
        for adapter, down, up, bias in zip(adapters, downs, ups, biases):
            adapter.down.weight, adapter.up.weight, adapter.up.bias = down, up, bias
        self.max_depth = len(adapters)

    def runs(self, h: Tensor) -> bool:
        """Whether rows h (n, d) take the native call: CPU inference in the adapters' dtype."""
        return h.dim() == 2 and h.shape[1] == self.down.shape[2] and native_rows(h, self.down.dtype)

    def __call__(self, h: Tensor, depth: Tensor) -> Tensor:
        """Each row of h (n, d) through the adapter of its depth (n,); rows at max depth pass as they are."""
        depths = np.ascontiguousarray(depth.cpu().numpy(), dtype=np.int64)
        if depths.shape != (len(h),) or (depths < 0).any():
            raise ValueError(f"exit adapters: depths {depths.tolist()} for {len(h)} rows")
        order = np.argsort(depths, kind="stable")
        order = np.ascontiguousarray(order[depths[order] < self.max_depth])
        if not len(order):  # every row at full depth
            return h
        h = h.contiguous()
        out = torch.empty_like(h)
        status = native.kernel("exit_adapters", h.dtype)(
            h.data_ptr(), out.data_ptr(), h.shape[0], h.shape[1], self.down.shape[1], order.ctypes.data, len(order),
            depths.ctypes.data, self.down.data_ptr(), self.up.data_ptr(), self.up_bias.data_ptr(),
            torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"exit adapters failed on {h.shape[0]} rows (out of memory)")
        return out
