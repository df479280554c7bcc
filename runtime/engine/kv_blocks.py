"""Paged KV cache accounting: a free list of physical block ids.

One block id covers `block_size` token positions and every KV slot of those tokens
(prelude layers, each core slot, coda layers) in the executor's cache tensor, so the
allocator only ever counts token positions.
"""

from __future__ import annotations


class NoFreeBlocks(Exception):
    """The pool has fewer free blocks than were asked for; nothing was allocated."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """A free list over physical KV block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be > 0")
        if block_size <= 0:
            raise ValueError(f"block_size={block_size} must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids are handed out first
        self._is_free = [True] * num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return cdiv(num_tokens, self.block_size)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks off the free list; raise `NoFreeBlocks` (allocating none) when short."""
        if n < 0:
            raise ValueError(f"cannot allocate n={n} blocks; n must be >= 0")
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._is_free[b] = False
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the free list."""
        for b in blocks:
            assert not self._is_free[b], f"double free of KV block {b}"
            self._is_free[b] = True
            self._free.append(b)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used / self.num_blocks
