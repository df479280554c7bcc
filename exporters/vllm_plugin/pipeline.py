"""Pipeline-parallel stages of the vLLM plugin: which prelude layers, core steps and coda layers a stage runs.

The model is a sequence of n_prelude + max_depth + n_coda units (a prelude layer, a core step, a
coda layer), split into contiguous ranges by vLLM's own `get_pp_indices`. A stage holds the blocks
and KV slots its units use (under the fixed schedule, step s uses pool block s; recurrent and
routed steps may use any pool block, so every stage with a core step holds the pool), the
embedding if it is first and the LM head if it is last. Between stages travel the residual
stream, which tokens are still in the core and each token's depth so far.

Under kv_fill 'latest' and 'shared' an exited token's entry comes from an earlier step's K/V (or
slot 0), which may live on another stage; those checkpoints are refused with pipeline parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.utils import get_pp_indices

from runtime.config import ModelConfig
from runtime.kv_fill import KVFill


@dataclass(frozen=True)
class Stage:
    cfg: ModelConfig
    start: int  # units [start, end)
    end: int
    first: bool
    last: bool

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, size: int) -> Stage:
        units = cfg.n_prelude + cfg.max_depth + cfg.n_coda
        if size > 1 and cfg.kv_fill is not KVFill.PROPAGATE:
            raise ValueError(f"pipeline parallelism needs kv_fill='propagate' (this checkpoint has "
                             f"{cfg.kv_fill.value!r}: an exited token's entry would come from another stage)")
        if size > units:
            raise ValueError(f"pipeline_parallel_size={size} exceeds the model's {units} layers and core steps")
        start, end = get_pp_indices(units, rank, size)
        return cls(cfg, start, end, rank == 0, rank == size - 1)

    def _part(self, offset: int, n: int) -> range:
        return range(max(self.start - offset, 0), max(min(self.end - offset, n), 0))

    @property
    def prelude(self) -> range:
        return self._part(0, self.cfg.n_prelude)

    @property
    def steps(self) -> range:
        return self._part(self.cfg.n_prelude, self.cfg.max_depth)

    @property
    def coda(self) -> range:
        return self._part(self.cfg.n_prelude + self.cfg.max_depth, self.cfg.n_coda)

    @property
    def ends_core(self) -> bool:
        """This stage runs the last core step (where exit adapters apply)."""
        return self.cfg.max_depth - 1 in self.steps

    def holds_block(self, kind: str, i: int) -> bool:
        if kind != "pool":
            return i in getattr(self, kind)
        if self.cfg.schedule == "fixed":
            return i in self.steps
        return len(self.steps) > 0

    def holds_slot(self, slot: int) -> bool:
        cfg = self.cfg
        if slot < cfg.n_prelude:
            return slot in self.prelude
        if slot < cfg.n_prelude + cfg.n_core_slots:
            return any(cfg.n_prelude + cfg.kv_fill.slot(s) == slot for s in self.steps)
        return slot - cfg.n_prelude - cfg.n_core_slots in self.coda
