"""Row buckets: the row counts that linears on CPU run at, and activations with room for them.

oneDNN builds and caches a kernel for each row count it sees, about 0.5-1.5 MB each. So past 16
rows a call runs at its row bucket (`row_bucket`), and a server sees a few dozen row counts per
weight shape, not one per prefill length.

Padding a call's rows up to the bucket copied its whole input. On a 2-core AMX Xeon, eight
134-token prompts spent 10% of their step on those copies. So the native kernels that feed
linears (RMSNorm, silu_mul) and the executor's attention outputs allocate their rows with room for
the bucket (`empty_rows`). A linear then reads such an input at the bucket without a copy
(`with_room`).

The rows past a tensor's own are whatever memory holds there, and they may be rows that another
tensor holds. A GEMM's output row depends on its own input row alone, so those rows only reach
output rows that are dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_bucket(rows: int) -> int:
    """The row count a oneDNN call runs. It is exact up to 16 rows, then the next multiple of 16 up to
    128, then 8 steps per doubling (each a multiple of 16). That makes at most 16 + 7 + 8 counts per
    doubling, and at most 1/8 more rows than asked for past 128. (With 4 steps, a 1075-token prompt
    ran 1280 rows: its linears took 1.3x those of 1024 rows, while oneDNN on 1075 unpadded rows
    took 1.0x.)"""
    if rows <= 16:
        return rows
    if rows <= 128:
        return -(-rows // 16) * 16
    base = 128
    while base * 2 < rows:
        base *= 2
    step = base // 8
    return -(-rows // step) * step


def empty_rows(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialized tensor of `shape`, with like's dtype and device, whose storage holds its rows
    (all dims but the last) up to their row bucket, so `with_room` reads it there without a copy.
    The extra rows stay uninitialized too (zeroing them cost 18 us a call, 0.7% of a prefill step)."""
    width = shape[-1] if shape else 1
    rows = (torch.Size(shape).numel() // width) if width else 0
    bucket = row_bucket(rows)
    if bucket == rows or not width:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.empty(bucket, width, dtype=like.dtype, device=like.device)[:rows].view(shape)


def with_room(x: Tensor, rows: int) -> Tensor | None:
    """x read as `rows` rows of its last dim, where its storage holds them contiguously from x's
    start (x was made by `empty_rows`, or is a leading slice of a larger tensor); else None."""
    width = x.shape[-1]
    if not x.is_contiguous():
        return None
    end = (x.storage_offset() + rows * width) * x.element_size()
    if end > x.untyped_storage().nbytes():
        return None
    return x.as_strided((rows, width), (width, 1))
