"""The rows of an engine step still in the core, and the exit test that takes rows out of it.

Exits are decided on the host: a decode step has a few dozen rows, and as torch ops the test and
the bookkeeping after it cost about twenty dispatches a core step (a compare, a mask, any, nonzero,
index_put, and boolean indexing of the rows, their inputs and queries): a budget-0.6 step ran 2934
ATen ops against 1105 at full depth (SmolLM2, bf16, batch 8, one Zen 5 CPU). In numpy they cost microseconds, and
the device sees one index tensor per step at which rows leave, reused by every later step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class LiveRows:
    """Rows 0 .. n - 1 of a step, of which `host` (numpy) and `rows` (the same indices, a tensor on the
    device) are still in the core; `alive` marks them per row on the device, `depth` counts the core
    steps each row ran (its exit step, or max_depth)."""

    def __init__(self, n: int, max_depth: int, device: torch.device) -> None:
        self.device = device
        self.host = np.arange(n)
        self.rows = torch.arange(n, device=device)
        self.alive = torch.ones(n, dtype=torch.bool, device=device)
        self.depth = np.full(n, max_depth)
        self.num_rows = n

    def __len__(self) -> int:
        return len(self.host)

    def stops(self, bar: np.ndarray, s: int, score: Tensor | None, of_all_rows: bool) -> np.ndarray:
        """Which live rows leave before step s: those at their cap (bar +inf) and those whose exit score
        is below their bar. bar (n, max_depth), the exit bars (executor `_exit_bars`); score: the scores
        of all rows (of_all_rows) or of the live rows, or None where no row is priced at this step."""
        bar_s = bar[self.host, s]
        stop = bar_s == np.inf
        if score is not None:
            scores = score.float().cpu().numpy()
            stop |= (scores[self.host] if of_all_rows else scores) < bar_s
        return stop

    def leave(self, stop: np.ndarray, s: int) -> None:
        """The live rows marked in stop (a mask over `host`) exit before step s."""
        gone = self.host[stop]
        self.depth[gone] = s
        self.host = self.host[~stop]
        self.rows = torch.from_numpy(self.host).to(self.device)
        self.alive[torch.from_numpy(gone).to(self.device)] = False

    def within(self, group: Tensor) -> tuple[Tensor, Tensor]:
        """Of a group of row indices: the positions of its live rows in it, and those rows."""
        if len(group) == self.num_rows:  # all rows, in order
            return self.rows, self.rows
        keep = self.alive[group].nonzero().squeeze(1)
        return keep, group[keep]
