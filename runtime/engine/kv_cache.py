"""Paged KV cache for every layer slot: prelude layers, core slots, coda layers.

One physical block id covers `block_size` token positions of *all* slots, so the scheduler
counts positions only. Core slots: one per step, or a single one with kv_fill='shared'
(core KV memory falls by a factor of max_depth).
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.config import ModelConfig


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.num_slots = cfg.n_prelude + cfg.n_core_slots + cfg.n_coda
        shape = (self.num_slots, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)  # (slot, position, Hkv, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._slots = [(self.k[s], self.v[s]) for s in range(self.num_slots)]  # views, made once (2 ops a layer)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        slots = cfg.n_prelude + cfg.n_core_slots + cfg.n_coda
        return 2 * slots * block_size * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8

    def prelude_slot(self, layer: int) -> int:
        return layer

    def core_slot(self, step: int) -> int:
        return self.cfg.n_prelude + self.cfg.kv_fill.slot(step)

    def coda_slot(self, layer: int) -> int:
        return self.cfg.n_prelude + self.cfg.n_core_slots + layer

    def write(self, slot: int, index: Tensor, k: Tensor, v: Tensor) -> None:
        """index: (n,) flat cache positions; k, v: (n, Hkv, D)."""
        self.k[slot].index_copy_(0, index, k.to(self.k.dtype))
        self.v[slot].index_copy_(0, index, v.to(self.v.dtype))

    def copy(self, src_slot: int, dst_slot: int, index: Tensor) -> None:
        self.k[dst_slot, index] = self.k[src_slot, index]
        self.v[dst_slot, index] = self.v[src_slot, index]

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy every slot's entries at flat positions src to dst (compaction after a thought is dropped)."""
        if src:
            src_t, dst_t = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
            self.k[:, dst_t] = self.k[:, src_t]
            self.v[:, dst_t] = self.v[:, src_t]

    def in_place(self, slot: int) -> tuple[Tensor, Tensor]:
        """One slot's k, v as they are stored: (positions, Hkv, D), contiguous (for `paged_decode`)."""
        return self._slots[slot]

    def gather(self, slot: int, tables: Tensor) -> tuple[Tensor, Tensor]:
        """tables: (R, W) block ids -> k, v: (R, Hkv, W * block_size, D), the blocks' positions in order.
        A block's positions are contiguous, so this copies whole blocks (one index per block)."""
        R, W = tables.shape
        flat = tables.reshape(-1)
        k, v = (c[slot].view(self.num_blocks, -1).index_select(0, flat).view(R, W * self.block_size, *c.shape[2:])
                for c in (self.k, self.v))
        return k.transpose(1, 2), v.transpose(1, 2)
