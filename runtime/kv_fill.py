"""KVFill: where an exited token's entries at deeper core KV slots come from.

Attention at core step s reads the KV slot of step s. A token still in the core writes its own
entry there; for a token that already exited, the checkpoint's policy decides. The model, the
engine's executor and KV cache, the FLOP model and the exporters ask this enum rather than
compare strings, so a new policy is added here and at the few places that implement it.
"""

from __future__ import annotations

import enum


class KVFill(str, enum.Enum):
    """The value is what config.json holds."""

    PROPAGATE = "propagate"  # the exit state through the K/V projections of the block it would use (CALM)
    LATEST = "latest"  # a copy of the token's deepest computed entry (Huginn)
    SHARED = "shared"  # every core step reads slot 0's entry, so one physical slot (MoR, Ouro)

    def __str__(self) -> str:
        return self.value

    @property
    def fills_by_projection(self) -> bool:
        """Exited tokens still run the K/V projections at each deeper step."""
        return self is KVFill.PROPAGATE

    @property
    def copies_deepest(self) -> bool:
        """Exited tokens copy their deepest computed entry into each deeper slot."""
        return self is KVFill.LATEST

    @property
    def reads_slot0(self) -> bool:
        """Every core step attends over slot 0's entries."""
        return self is KVFill.SHARED

    def writes_slot(self, step: int) -> bool:
        """Whether core step `step` writes entries of its own (shared: only step 0 does)."""
        return step == 0 or not self.reads_slot0

    def slot(self, step: int) -> int:
        """The physical core KV slot that core step `step` reads and writes."""
        return 0 if self.reads_slot0 else step

    def num_slots(self, max_depth: int) -> int:
        """Physical core KV slots per token."""
        return 1 if self.reads_slot0 else max_depth
